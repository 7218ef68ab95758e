"""GRPO (and GoLongRL's TMN-Reweight through `rl.advantage`): the on-policy loop.

Each step: take prompts_per_step prompts -> G rollouts each from the engine -> rewards ->
[dynamic sampling: drop groups whose rewards are all equal, generate more, up to max_gen_batches
rounds] -> advantages (keel/rl/advantages.py) -> trainer recomputes log-probs (the "old" policy)
-> truncated importance weights between trainer and rollout log-probs (keel/rl/losses.py) ->
policy loss (+ KL to a frozen reference, - entropy bonus), token-mean over each mini-batch ->
optimizer step(s) -> push the new weights to the engine (version = step). With
rl.one_step_off_policy the next step's rollouts are generated while this step trains
(keel/rl/rollout_ahead.py).

Every random draw is a function of train.seed and the prompt: prompts come from a PromptStream and
each prompt's samples are seeded from its place in that stream, so a resumed run repeats an
uninterrupted one exactly, and a run on many ranks (each generating a share of the prompts,
keel/rl/sharding.py) the run on one process.
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
from keel.rl.rollout_ahead import RolloutGroup, RolloutsAhead
from keel.rl.rewards import get_reward
from keel.rl.run import PromptStream, RLRun
from keel.rl.scoring import logprobs_of, packed_logprobs_of
from keel.rl.sharding import whole_parameters

EVAL_STREAM = 1  # RLRun.prompt_seed: the held-out prompts draw apart from the training stream
ENCODED_PROMPTS_KEPT = 4096  # token ids of the most recently used prompts, for their n samples and evals


def is_loss_share(key: str) -> bool:
    """A metric that is this micro-batch's share of the mini-batch's aggregate (the loss terms and the
    entropy, keel/rl/losses.py): summed over micro-batches, not averaged."""
    return key.startswith("loss/") or key == "policy/entropy"


@register_rl_trainer("grpo")
class GRPOTrainer(RLRun):
    runs_sharded = True

    @classmethod
    def validate_config(cls, rl) -> None:
        if rl.group_size < 2:  # a single rollout has no group to be compared against
            raise ConfigError(f"rl.group_size: GRPO needs at least 2 rollouts per prompt, got {rl.group_size}")
        if not rl.prompts:
            raise ConfigError("rl.prompts: required, a prompt source (e.g. {source: reasoning_gym, "
                              "name: basic_arithmetic, size: 512, seed: 0})")
        if rl.one_step_off_policy and rl.is_cap <= 0:
            raise ConfigError("rl.one_step_off_policy: the rollouts come from the previous step's weights, which "
                              "only the importance weights correct for; set rl.is_cap > 0 (e.g. 2.0)")
        if rl.one_step_off_policy and rl.engine != "native":
            raise ConfigError(f"rl.one_step_off_policy: generates beside training with rl.engine: native only for "
                              f"now (got {rl.engine})")
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
        if self.ranks.sharded and rl.engine != "native":
            raise ConfigError(f"rl.engine: {rl.engine} rolls out for one trainer process only for now; under "
                              f"torchrun use rl.engine: native (each rank generates its share of the prompts)")
        self.engine = build_engine(rl.engine, self.policy, rl)
        self.reference = None
        if rl.kl_coef > 0:  # KL is measured against the starting policy, frozen
            self.reference = (self.load_model(rl.policy, trainable=False)[0] if self.ranks.sharded
                              else copy.deepcopy(self.policy).eval().requires_grad_(False))
        self.advantage_state: dict = {}
        self.ahead = RolloutsAhead(self.collect) if rl.one_step_off_policy else None

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
        if len(kept) < len(items) and self.ranks.is_main:
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
        state = {"prompts": self.prompts.state_dict(), "advantage": self.advantage_state}
        if self.ahead is not None:  # the next step's rollouts, made by weights no checkpoint holds
            state["ahead"] = self.ahead.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.prompts.load_state_dict(state["prompts"])
            self.advantage_state = state.get("advantage", {})
            if self.ahead is not None:
                self.ahead.load_state_dict(state.get("ahead", {}), self.prompts.item_at)

    def after_resume(self) -> None:
        self.sync_weights()

    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        self.engine.update_weights(whole_parameters(self.policy), self.step)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- rollouts
    def _score(self, items, rollouts) -> list[float]:
        rewards = []
        for ro in rollouts:
            item = items[ro.prompt_index]
            tokens = ro.tokens[:-1] if ro.finish_reason == "stop" else ro.tokens
            rewards.append(float(get_reward(item.reward)(self.tokenizer.decode(tokens), item)))
        return rewards

    def rollouts_of(self, items: list, prompt_ids: list, params: SamplingParams, first_position: int, stream: int = 0):
        """(rollouts, rewards, the slowest rank's generation seconds) of every item, on every rank."""
        return self.generate_shares(prompt_ids, params, first_position, stream,
                                    score=lambda rollouts: self._score(items, rollouts))

    def collect(self) -> tuple[list, dict]:
        """RolloutGroups to train on, and rollout metrics (made with the engine's weights of now)."""
        rl, sampling = self.rl, self.rl.sampling
        kept, seen_rewards, seen_tasks, lengths = [], [], [], []
        tokens, seconds, filtered, logprob_sum = 0, 0.0, 0, 0.0
        version = self.engine.version
        rounds = rl.max_gen_batches if rl.dynamic_sampling else 1
        for round_ in range(rounds):
            first = self.prompts.position
            items = self.prompts.take(rl.prompts_per_step)
            prompt_ids = [self.encode_prompt(it.prompt) for it in items]
            params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p, top_k=sampling.top_k, stop_ids=self.stop_ids,
                                    n=rl.group_size)
            rollouts, rewards, round_seconds = self.rollouts_of(items, prompt_ids, params, first)
            seconds += round_seconds
            tokens += sum(len(r.tokens) for r in rollouts)
            lengths += [len(r.tokens) for r in rollouts]
            logprob_sum += sum(sum(r.logprobs) for r in rollouts)
            seen_rewards += rewards
            seen_tasks += [items[r.prompt_index].task for r in rollouts]
            g = rl.group_size
            for i, item in enumerate(items):
                group_rewards = rewards[i * g:(i + 1) * g]
                if rl.dynamic_sampling and max(group_rewards) == min(group_rewards):
                    filtered += 1  # no signal: every advantage would be zero
                    continue
                kept.append(RolloutGroup(item, first + i, prompt_ids[i], rollouts[i * g:(i + 1) * g], group_rewards))
            if len(kept) >= rl.prompts_per_step:
                break
        kept = kept[:rl.prompts_per_step]
        rewards_t = torch.tensor(seen_rewards)
        metrics = {"reward/mean": rewards_t.mean().item(), "reward/std": rewards_t.std().item() if len(rewards_t) > 1 else 0.0,
                   "rollout/response_len_mean": sum(lengths) / len(lengths), "rollout/tokens": tokens,
                   "rollout/tokens_per_s": tokens / max(seconds, 1e-9), "rollout/time_s": seconds,
                   "rollout/gen_rounds": round_ + 1, "rollout/groups_kept": len(kept),
                   "rollout/groups_filtered": filtered, "rollout/logprob_mean": logprob_sum / max(tokens, 1),
                   "rollout/weights_version": version}
        by_task = defaultdict(list)
        for task, r in zip(seen_tasks, seen_rewards):
            by_task[task].append(r)
        for task, values in by_task.items():
            t = torch.tensor(values)
            metrics[f"reward/mean/{task}"] = t.mean().item()
            metrics[f"reward/std/{task}"] = t.std().item() if len(values) > 1 else 0.0
        return kept, metrics

    # ---------------------------------------------------------------- training
    def _batch(self, groups) -> dict:
        """Right-padded prompt+response sequences, their response mask and rollout log-probs."""
        seqs, rollout_lps, starts = [], [], []
        for group in groups:
            for ro in group.rollouts:
                seqs.append(group.prompt_ids + ro.tokens)
                rollout_lps.append(ro.logprobs)
                starts.append(len(group.prompt_ids))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        rollout_lp = torch.zeros(len(seqs), width)
        for i, (s, lp, start) in enumerate(zip(seqs, rollout_lps, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, start:len(s)] = True
            rollout_lp[i, start:len(s)] = torch.tensor(lp)
        return {"ids": ids.to(self.device), "mask": mask.to(self.device), "rollout_lp": rollout_lp.to(self.device),
                "tokens": sum(len(s) for s in seqs), "lengths": [len(s) for s in seqs]}

    def _logprobs(self, model, batch: dict, i: int, j: int, with_entropy: bool = False):
        """Log-probs (and entropies) [j - i, width] of rows i..j, width = their longest: padded rows, or
        packed into one row under rl.micro_batch_tokens."""
        lengths = batch["lengths"][i:j]
        width = max(lengths)
        ids, mask = batch["ids"][i:j, :width], batch["mask"][i:j, :width]
        if self.rl.micro_batch_tokens:
            return packed_logprobs_of(model, ids, mask, lengths, self.rl.sampling.temperature, with_entropy)
        return logprobs_of(model, ids, mask, self.rl.sampling.temperature, with_entropy=with_entropy)

    def _micro_loss(self, batch: dict, i: int, j: int, adv, old_lp, scale: losses.LossScale):
        """Loss of micro-batch rows i..j, normalised by the mini-batch's counts (`scale`), and its metrics."""
        rl = self.rl
        width = max(batch["lengths"][i:j])
        mask, rollout_lp, adv = batch["mask"][i:j, :width], batch["rollout_lp"][i:j, :width], adv[i:j]
        old_lp = None if old_lp is None else old_lp[i:j, :width]
        with self.autocast():
            out = self._logprobs(self.policy, batch, i, j, with_entropy=rl.entropy_coef > 0)
        lp, entropy = out if isinstance(out, tuple) else (out, None)
        old = lp.detach() if old_lp is None else old_lp
        is_weights, metrics = None, {}
        if rl.is_cap > 0:  # trainer vs rollout engine: correct the mismatch, truncated at is_cap
            cap = (rl.is_cap_low, rl.is_cap) if rl.is_cap_low > 0 else rl.is_cap
            is_weights, metrics = losses.truncated_is_weights(old, rollout_lp, mask, cap, rl.is_veto, rl.is_low_mode)
        ref_lp = None
        if self.reference is not None:
            with torch.no_grad(), self.autocast():
                ref_lp = self._logprobs(self.reference, batch, i, j)
        loss, pg_metrics = losses.policy_loss(rl.loss, lp, old, adv, mask, loss_options(rl), is_weights,
                                              ref_logprobs=ref_lp, entropy=entropy, agg=rl.loss_agg, scale=scale)
        metrics.update({k if "/" in k else f"policy/{k}": v for k, v in pg_metrics.items()})  # e.g. policy/clip_fraction
        with torch.no_grad():  # engine vs trainer mismatch, logged whatever the IS setting
            metrics["is/logprob_abs_diff"] = float(((old - rollout_lp).abs() * mask).sum() / mask.sum().clamp(min=1))
        return loss, metrics

    def train_step(self) -> dict:
        rl = self.rl
        if self.ahead is None:
            groups, row = self.collect()
            self.engine.sleep()  # frees a colocated engine's memory for training (the update wakes it)
        else:  # this step's rollouts were made while the last step trained; start the next step's now
            t0 = time.perf_counter()
            groups, row = self.ahead.take()
            row["rollout/wait_s"] = time.perf_counter() - t0
            if self.step + 1 < self.total_steps:
                self.ahead.start()
        # How many updates old the weights that made these rollouts are (0 on-policy, 1 off-policy).
        row["rollout/policy_lag"] = self.step - row.pop("rollout/weights_version")
        if not groups:  # every group filtered: nothing to learn from this step
            row.update(self.optimizer_step())
            return row
        rewards = torch.tensor([r for g in groups for r in g.rewards])
        group_ids = torch.arange(len(groups)).repeat_interleave(rl.group_size)
        tasks = [g.item.task for g in groups for _ in range(rl.group_size)]
        adv = compute_advantages(rl.advantage, rewards, group_ids, tasks, rl.advantage_cfg, self.advantage_state)
        batch = self._batch(groups)
        adv = adv.to(self.device).float()
        t0 = time.perf_counter()
        self.policy.train()
        n = batch["ids"].shape[0]
        bounds = torch.linspace(0, n, rl.mini_batches + 1).round().long().tolist()
        plan = [(lo, hi, self._micro_slices(lo, hi, batch["lengths"])) for lo, hi in zip(bounds[:-1], bounds[1:])]
        old_all = None
        if rl.mini_batches > 1:  # later mini-batches must use the pre-update policy as "old"
            old_all = torch.zeros_like(batch["rollout_lp"])
            with torch.no_grad(), self.autocast():
                for _, _, slices in plan:
                    for i, j, _ in slices:
                        width = max(batch["lengths"][i:j])
                        old_all[i:j, :width] = self._logprobs(self.policy, batch, i, j)
        sums, weights, maxes, loss_sum = defaultdict(float), defaultdict(float), {}, 0.0
        for lo, hi, slices in plan:
            scale = losses.LossScale(tokens=batch["mask"][lo:hi].sum().clamp(min=1).item(), sequences=hi - lo,
                                     horizon=rl.sampling.max_tokens)
            for i, j, counted in slices:
                mask = batch["mask"][i:j]
                loss, metrics = self._micro_loss(batch, i, j, adv, old_all, scale)
                # Already normalised by the whole mini-batch's counts; FSDP averages gradients over the
                # data-parallel ranks, which each hold different sequences: undo that.
                (loss * (counted * self.ranks.dp_size)).backward()
                if not counted:  # a rank with no sequence left runs a zero-weighted one (see _micro_slices)
                    continue
                loss_sum += loss.item()
                for k, v in metrics.items():
                    if is_loss_share(k):
                        sums[k] += v
                    elif k.endswith("_max"):
                        maxes[k] = max(maxes.get(k, v), v)
                    else:  # per micro-batch means: weight by tokens
                        sums[k] += v * mask.sum().item()
                        weights[k] += mask.sum().item()
            row.update(self.optimizer_step())
        train_s = time.perf_counter() - t0
        row.update(self._whole_step_metrics(sums, weights, maxes))
        row.update({"loss": self.ranks.all_sum([loss_sum])[0] / rl.mini_batches,
                    "policy/advantage_abs_mean": adv.abs().mean().item(), "train_tokens": batch["tokens"],
                    "train_time_s": train_s, "train_tokens_per_s": batch["tokens"] / max(train_s, 1e-9)})
        if self.ahead is not None:  # the engine's weights may change only once the next rollouts are made
            t0 = time.perf_counter()
            self.ahead.finish()
            row["rollout/wait_s"] += time.perf_counter() - t0
        self.step += 1  # the engine's weights carry the version of the step that made them
        row["rollout/weight_sync_s"] = self.sync_weights()
        self.step -= 1
        return row

    def _micro_slices(self, lo: int, hi: int, lengths: list[int]) -> list[tuple[int, int, int]]:
        """(start, stop, counted) of this rank's micro-batches of mini-batch rows [lo, hi): its share of
        the rows, micro_batch at a time (or as many as fit rl.micro_batch_tokens). Every rank runs as many micro-batches as the rank with the
        largest share (FSDP's gathers and reduces must line up across ranks); a rank short of rows
        runs row lo again with its loss weighted 0 (counted = 0)."""
        share, size, budget = self.ranks.share(hi - lo), self.rl.micro_batch, self.rl.micro_batch_tokens
        start, stop = lo + share.start, lo + share.stop
        if not budget:
            slices = [(i, min(i + size, stop), 1) for i in range(start, stop, size)]
            return slices + [(lo, lo + 1, 0)] * (self.ranks.micro_batch_count(hi - lo, size) - len(slices))
        slices, first, used = [], start, 0  # in order, as many rows as fit the budget (at least one)
        for row in range(start, stop):
            n = lengths[row]
            if row > first and used + n > budget:
                slices.append((first, row, 1))
                first, used = row, 0
            used += n
        if stop > start:
            slices.append((first, stop, 1))
        most = int(self.ranks.all_max([len(slices)])[0])  # the ranks' counts differ: every rank runs the most
        return slices + [(lo, lo + 1, 0)] * (most - len(slices))

    def _whole_step_metrics(self, sums: dict, weights: dict, maxes: dict) -> dict:
        """The step's metrics over every rank's micro-batches: token-weighted means, sums of the loss
        terms' shares, maxima."""
        sums, weights = self.ranks.sum_dict(sums), self.ranks.sum_dict(weights)
        out = {k: v / max(self.rl.mini_batches if is_loss_share(k) else weights[k], 1) for k, v in sums.items()}
        out.update(self.ranks.max_dict(maxes))
        return out

    # ---------------------------------------------------------------- held-out eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_items:
            return {}
        rl = self.rl
        params = SamplingParams(max_tokens=rl.eval_max_tokens or rl.sampling.max_tokens,
                                temperature=rl.eval_temperature, top_p=rl.eval_top_p, stop_ids=self.stop_ids, n=1)
        prompt_ids = [self.encode_prompt(it.prompt) for it in self.eval_items]
        rollouts, rewards, _ = self.rollouts_of(self.eval_items, prompt_ids, params, 0, stream=EVAL_STREAM)
        out = {"eval_accuracy": sum(rewards) / len(rewards),
               "eval_response_len": sum(len(r.tokens) for r in rollouts) / len(rollouts)}
        by_task = defaultdict(list)
        for item, r in zip(self.eval_items, rewards):
            by_task[item.task].append(r)
        if len(by_task) > 1:
            out.update({f"eval_accuracy/{t}": sum(v) / len(v) for t, v in by_task.items()})
        return out
