"""GRPO (and GoLongRL's TMN-Reweight through `rl.advantage`): the on-policy loop.

Each step: take prompts_per_step prompts -> G rollouts each from the engine -> rewards ->
[dynamic sampling: drop groups whose rewards are all equal, generate more, up to max_gen_batches
rounds] -> advantages (keel/rl/advantages.py) -> trainer recomputes log-probs (the "old" policy)
-> truncated importance weights between trainer and rollout log-probs (keel/rl/losses.py) ->
policy loss (+ KL to a frozen reference, - entropy bonus), token-mean over each mini-batch ->
optimizer step(s) -> push the new weights to the engine (version = step).

Every random draw is a function of (train.seed, step): prompts come from a PromptStream and each
generation round is seeded from the step, so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import copy
import time
from collections import OrderedDict, defaultdict

import torch

from keel.errors import ConfigError
from keel.rl import losses
from keel.rl.advantages import compute_advantages
from keel.rl.config import check_registries, loss_options, register_rl_trainer
from keel.rl.engines import SamplingParams, build_engine
from keel.rl.prompts import load_prompts
from keel.rl.rewards import get_reward
from keel.rl.run import PromptStream, RLRun
from keel.rl.scoring import logprobs_of

ENCODED_PROMPTS_KEPT = 4096  # token ids of the most recently used prompts, for their n samples and evals


@register_rl_trainer("grpo")
class GRPOTrainer(RLRun):
    @classmethod
    def validate_config(cls, rl) -> None:
        if rl.group_size < 2:  # a single rollout has no group to be compared against
            raise ConfigError(f"rl.group_size: GRPO needs at least 2 rollouts per prompt, got {rl.group_size}")
        if not rl.prompts:
            raise ConfigError("rl.prompts: required, a prompt source (e.g. {source: reasoning_gym, "
                              "name: basic_arithmetic, size: 512, seed: 0})")
        check_registries(rl)

    @property
    def updates_per_step(self) -> int:
        return self.rl.mini_batches

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        rl = self.rl
        self._encoded: OrderedDict = OrderedDict()  # recently encoded prompts (a prompt's samples, eval)
        self.prompts = PromptStream(self.fitting_prompts(load_prompts(rl.prompts), "rl.prompts"), self.cfg.train.seed)
        self.eval_items = self.fitting_prompts(load_prompts(rl.eval_prompts), "rl.eval_prompts") if rl.eval_prompts else []
        self.stop_ids = self._stop_ids()
        self.engine = build_engine(rl.engine, self.policy, rl)
        self.reference = None
        if rl.kl_coef > 0:  # KL is measured against the starting policy, frozen
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.advantage_state: dict = {}

    def _stop_ids(self) -> tuple:
        ids = [self.tokenizer.eos_id] if self.rl.sampling.stop_at_eos else []
        for text in self.rl.sampling.stop:
            pieces = self.tokenizer.encode(text)
            if len(pieces) != 1:
                raise ConfigError(f"rl.sampling.stop: {text!r} is {len(pieces)} tokens; stop strings must be "
                                  f"single tokens")
            ids += pieces
        return tuple(dict.fromkeys(ids))

    def fitting_prompts(self, items: list, key: str) -> list:
        """The items whose templated prompt fits rl.max_prompt_tokens, under rl.overlong_prompts: filter
        (all of them under truncate_left, cut when encoded)."""
        if self.rl.overlong_prompts == "truncate_left":
            return items
        limit = self.rl.max_prompt_tokens
        kept = [item for item in items if len(self.encode_prompt(item.prompt, truncate=False)) <= limit]
        if not kept:
            raise ConfigError(f"{key}: every prompt is longer than rl.max_prompt_tokens = {limit} tokens; raise it, "
                              f"or set rl.overlong_prompts: truncate_left")
        if len(kept) < len(items):
            print(f"keel rl: {key}: dropped {len(items) - len(kept)} of {len(items)} prompts longer than "
                  f"rl.max_prompt_tokens = {limit}", flush=True)
        return kept

    def encode_prompt(self, text: str, truncate: bool = True) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            wrapped = text
            if self.rl.chat_template and self.tokenizer.chat_template:
                turns = [{"role": "user", "content": text}]
                if self.rl.system_prompt is not None:
                    turns.insert(0, {"role": "system", "content": self.rl.system_prompt})
                wrapped = self.tokenizer.hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            ids = self._encoded[text] = self.tokenizer.encode(wrapped)
            if len(self._encoded) > ENCODED_PROMPTS_KEPT:  # bounded: a long run sees millions of prompts
                self._encoded.popitem(last=False)
        else:
            self._encoded.move_to_end(text)
        return ids[-self.rl.max_prompt_tokens:] if truncate else ids  # truncate_left cuts from the left

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "advantage": self.advantage_state}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.prompts.load_state_dict(state["prompts"])
            self.advantage_state = state.get("advantage", {})

    def after_resume(self) -> None:
        self.sync_weights()

    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        self.engine.update_weights(((n, p.detach()) for n, p in self.policy.named_parameters()), self.step)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- rollouts
    def _score(self, items, rollouts) -> list[float]:
        rewards = []
        for ro in rollouts:
            item = items[ro.prompt_index]
            tokens = ro.tokens[:-1] if ro.finish_reason == "stop" else ro.tokens
            rewards.append(float(get_reward(item.reward)(self.tokenizer.decode(tokens), item)))
        return rewards

    def collect(self) -> tuple[list, dict]:
        """Groups (item, prompt ids, rollouts, rewards) to train on, and rollout metrics."""
        rl, sampling = self.rl, self.rl.sampling
        kept, seen_rewards, seen_tasks, lengths = [], [], [], []
        tokens, seconds, filtered = 0, 0.0, 0
        rounds = rl.max_gen_batches if rl.dynamic_sampling else 1
        for round_ in range(rounds):
            items = self.prompts.take(rl.prompts_per_step)
            prompt_ids = [self.encode_prompt(it.prompt) for it in items]
            params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p, top_k=sampling.top_k, stop_ids=self.stop_ids,
                                    n=rl.group_size, seed=(self.cfg.train.seed * 1_000_003 + self.step) * 97 + round_)
            t0 = time.perf_counter()
            rollouts = self.engine.generate(prompt_ids, params)
            seconds += time.perf_counter() - t0
            rewards = self._score(items, rollouts)
            tokens += sum(len(r.tokens) for r in rollouts)
            lengths += [len(r.tokens) for r in rollouts]
            seen_rewards += rewards
            seen_tasks += [items[r.prompt_index].task for r in rollouts]
            g = rl.group_size
            for i, item in enumerate(items):
                group_rewards = rewards[i * g:(i + 1) * g]
                if rl.dynamic_sampling and max(group_rewards) == min(group_rewards):
                    filtered += 1  # no signal: every advantage would be zero
                    continue
                kept.append((item, prompt_ids[i], rollouts[i * g:(i + 1) * g], group_rewards))
            if len(kept) >= rl.prompts_per_step:
                break
        kept = kept[:rl.prompts_per_step]
        rewards_t = torch.tensor(seen_rewards)
        metrics = {"reward_mean": rewards_t.mean().item(), "reward_std": rewards_t.std().item() if len(rewards_t) > 1 else 0.0,
                   "response_len_mean": sum(lengths) / len(lengths), "rollout_tokens": tokens,
                   "rollout_tokens_per_s": tokens / max(seconds, 1e-9), "rollout_time_s": seconds,
                   "gen_rounds": round_ + 1, "groups_kept": len(kept), "groups_filtered": filtered}
        by_task = defaultdict(list)
        for task, r in zip(seen_tasks, seen_rewards):
            by_task[task].append(r)
        for task, values in by_task.items():
            t = torch.tensor(values)
            metrics[f"reward_mean/{task}"] = t.mean().item()
            metrics[f"reward_std/{task}"] = t.std().item() if len(values) > 1 else 0.0
        return kept, metrics

    # ---------------------------------------------------------------- training
    def _batch(self, groups) -> dict:
        """Right-padded prompt+response sequences, their response mask and rollout log-probs."""
        seqs, rollout_lps, starts = [], [], []
        for _, prompt_ids, rollouts, _ in groups:
            for ro in rollouts:
                seqs.append(prompt_ids + ro.tokens)
                rollout_lps.append(ro.logprobs)
                starts.append(len(prompt_ids))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        rollout_lp = torch.zeros(len(seqs), width)
        for i, (s, lp, start) in enumerate(zip(seqs, rollout_lps, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, start:len(s)] = True
            rollout_lp[i, start:len(s)] = torch.tensor(lp)
        return {"ids": ids.to(self.device), "mask": mask.to(self.device), "rollout_lp": rollout_lp.to(self.device),
                "tokens": sum(len(s) for s in seqs)}

    def _micro_loss(self, ids, mask, rollout_lp, adv, old_lp, scale: losses.LossScale):
        """Loss of one micro-batch, normalised by the mini-batch's counts (`scale`), and its metrics."""
        rl = self.rl
        with self.autocast():
            out = logprobs_of(self.policy, ids, mask, rl.sampling.temperature, with_entropy=rl.entropy_coef > 0)
        lp, entropy = out if isinstance(out, tuple) else (out, None)
        old = lp.detach() if old_lp is None else old_lp
        is_weights, metrics = None, {}
        if rl.is_cap > 0:  # trainer vs rollout engine: correct the mismatch, truncated at is_cap
            cap = (rl.is_cap_low, rl.is_cap) if rl.is_cap_low > 0 else rl.is_cap
            is_weights, metrics = losses.truncated_is_weights(old, rollout_lp, mask, cap, rl.is_veto, rl.is_low_mode)
        ref_lp = None
        if self.reference is not None:
            with torch.no_grad(), self.autocast():
                ref_lp = logprobs_of(self.reference, ids, mask, rl.sampling.temperature)
        loss, pg_metrics = losses.policy_loss(rl.loss, lp, old, adv, mask, loss_options(rl), is_weights,
                                              ref_logprobs=ref_lp, entropy=entropy, agg=rl.loss_agg, scale=scale)
        metrics.update(pg_metrics)
        with torch.no_grad():  # engine vs trainer mismatch, logged whatever the IS setting
            metrics["logprob_abs_diff"] = float(((old - rollout_lp).abs() * mask).sum() / mask.sum().clamp(min=1))
        return loss, metrics

    def train_step(self) -> dict:
        rl = self.rl
        groups, row = self.collect()
        if not groups:  # every group filtered: nothing to learn from this step
            row.update(self.optimizer_step())
            return row
        rewards = torch.tensor([r for g in groups for r in g[3]])
        group_ids = torch.arange(len(groups)).repeat_interleave(rl.group_size)
        tasks = [g[0].task for g in groups for _ in range(rl.group_size)]
        adv = compute_advantages(rl.advantage, rewards, group_ids, tasks, rl.advantage_cfg, self.advantage_state)
        batch = self._batch(groups)
        adv = adv.to(self.device).float()
        t0 = time.perf_counter()
        self.policy.train()
        n = batch["ids"].shape[0]
        old_all = None
        if rl.mini_batches > 1:  # later mini-batches must use the pre-update policy as "old"
            with torch.no_grad(), self.autocast():
                old_all = torch.cat([logprobs_of(self.policy, batch["ids"][i:i + rl.micro_batch],
                                                 batch["mask"][i:i + rl.micro_batch], rl.sampling.temperature)
                                     for i in range(0, n, rl.micro_batch)])
        sums, weights, losses_ = defaultdict(float), defaultdict(float), []
        bounds = torch.linspace(0, n, rl.mini_batches + 1).round().long().tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            scale = losses.LossScale(tokens=batch["mask"][lo:hi].sum().clamp(min=1).item(), sequences=hi - lo,
                                     horizon=rl.sampling.max_tokens)
            for i in range(lo, hi, rl.micro_batch):
                j = min(i + rl.micro_batch, hi)
                mask = batch["mask"][i:j]
                loss, metrics = self._micro_loss(batch["ids"][i:j], mask, batch["rollout_lp"][i:j], adv[i:j],
                                                 None if old_all is None else old_all[i:j], scale)
                loss.backward()  # already normalised by the mini-batch's counts
                losses_.append(loss.item())
                for k, v in metrics.items():
                    if k.startswith("loss/"):  # already a share of the mini-batch's token-mean
                        sums[k] += v
                        weights[k] = rl.mini_batches
                    else:  # per micro-batch means: weight by tokens
                        sums[k] += v * mask.sum().item()
                        weights[k] += mask.sum().item()
            row.update(self.optimizer_step())
        train_s = time.perf_counter() - t0
        row.update({k: sums[k] / max(weights[k], 1) for k in sums})
        row.update({"loss": sum(losses_) / rl.mini_batches, "advantage_abs_mean": adv.abs().mean().item(),
                    "train_tokens": batch["tokens"], "train_time_s": train_s,
                    "train_tokens_per_s": batch["tokens"] / max(train_s, 1e-9)})
        self.step += 1  # the engine's weights carry the version of the step that made them
        row["weight_sync_s"] = self.sync_weights()
        self.step -= 1
        return row

    # ---------------------------------------------------------------- held-out eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_items:
            return {}
        rl = self.rl
        params = SamplingParams(max_tokens=rl.eval_max_tokens or rl.sampling.max_tokens,
                                temperature=rl.eval_temperature, top_p=rl.eval_top_p, stop_ids=self.stop_ids,
                                n=1, seed=self.cfg.train.seed)
        rollouts = self.engine.generate([self.encode_prompt(it.prompt) for it in self.eval_items], params)
        rewards = self._score(self.eval_items, rollouts)
        out = {"eval_accuracy": sum(rewards) / len(rewards),
               "eval_response_len": sum(len(r.tokens) for r in rollouts) / len(rollouts)}
        by_task = defaultdict(list)
        for item, r in zip(self.eval_items, rewards):
            by_task[item.task].append(r)
        if len(by_task) > 1:
            out.update({f"eval_accuracy/{t}": sum(v) / len(v) for t, v in by_task.items()})
        return out
