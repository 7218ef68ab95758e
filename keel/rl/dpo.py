"""DPO (Rafailov et al. 2023) on preference pairs: the sigmoid loss, with optional label smoothing.

    logits_i = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss     = mean_i [ -(1 - eps) log sigmoid(logits_i) - eps log sigmoid(-logits_i) ]

(eps = label_smoothing: conservative DPO, the preferences are trusted with probability 1 - eps; TRL's
"sigmoid" loss.) Sequence log-probabilities are sums over the response tokens.

The reference, by `rl.dpo.reference`:
  model   the starting policy, frozen. With LoRA (`rl.dpo.lora`) that is the same model with its
          adapters switched off, so no second copy of the weights exists; without LoRA, a frozen copy.
  cached  the reference's sums computed once, before the first step, and stored with the pairs
          (`<run>/reference_logprobs.jsonl`, or already present in the pairs file): no reference
          forward during training at all.

Metrics: loss, rewards (beta * policy/reference log-ratio) of chosen and rejected, margin, accuracy
(chosen reward > rejected), and `kl_ref`: the exact full-vocabulary KL(pi || ref) per response token
(only when a reference model runs in the step, i.e. not with cached log-probabilities).
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from keel.config import build_dataclass
from keel.data.assets import corpus_files
from keel.errors import ConfigError
from keel.model.lora import LoRAConfig, adapters_disabled, apply_lora, has_lora
from keel.rl.config import register_rl_trainer
from keel.rl.preference import PairBatch, PreferencePair, load_pairs, pairs_from_documents, save_pairs, tokenize_pairs
from keel.rl.run import PromptStream, RLRun
from keel.rl.scoring import full_vocab_kl, response_logprobs
from keel.train.optim import adapter_optimizer


@dataclass
class PairBuildConfig:
    """Pairs built from real text (keel/rl/preference.py pairs_from_documents)."""
    corpora: list[str] = field(default_factory=lambda: ["kjv"])  # fetched corpora (keel fetch)
    n_pairs: int = 256  # pairs to build
    prompt_words: int = 24  # words of text in each prompt
    response_words: int = 12  # words in each response
    rejected: Literal["other_document", "shuffled"] = "other_document"  # rejected response: a passage of another document, or the chosen one's words shuffled
    seed: int = 0  # seed of the pair construction


@dataclass
class DPOConfig:
    """rl.trainer dpo: preference pairs, beta, the reference, optional LoRA."""
    pairs: Optional[str] = None  # a jsonl file of {prompt, chosen, rejected}
    build: Optional[PairBuildConfig] = None  # or pairs built from real text
    eval_fraction: float = 0.1  # pairs held out for the eval metrics
    beta: float = 0.1  # DPO temperature beta
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped preference labels
    reference: Literal["model", "cached"] = "model"  # the reference's log-probs: a frozen model in every step, or computed once and cached
    lora: Optional[LoRAConfig] = None  # train adapters only; the reference is the base
    pairs_per_step: int = 8  # pairs per optimizer step
    max_prompt_tokens: int = 512  # longer prompts are cut from the left
    max_response_tokens: int = 512  # longer responses are cut from the right
    # EOS after each response (as TRL does); null: for conversational pairs (chat messages) only, not for
    # text pairs, whose responses continue the prompt's text
    append_eos: Optional[bool] = None


def build_dpo_config(raw) -> DPOConfig:
    cfg = raw if isinstance(raw, DPOConfig) else build_dataclass(DPOConfig, raw or {}, "rl.dpo")
    if (cfg.pairs is None) == (cfg.build is None):
        raise ConfigError("rl.dpo: set exactly one of rl.dpo.pairs (a jsonl file) and rl.dpo.build "
                          "(pairs from real text)")
    if cfg.beta <= 0:
        raise ConfigError(f"rl.dpo.beta: must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"rl.dpo.label_smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"rl.dpo.eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
    for key in ("pairs_per_step", "max_prompt_tokens", "max_response_tokens"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"rl.dpo.{key}: must be > 0, got {getattr(cfg, key)}")
    if cfg.build is not None:
        b = cfg.build
        for key in ("n_pairs", "prompt_words", "response_words"):
            if getattr(b, key) <= 0:
                raise ConfigError(f"rl.dpo.build.{key}: must be > 0, got {getattr(b, key)}")
        if not b.corpora:
            raise ConfigError("rl.dpo.build.corpora: at least one corpus (e.g. kjv, shakespeare)")
    if cfg.lora is not None:
        cfg.lora.validate("rl.dpo.lora")
    return cfg


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict]:
    """Mean sigmoid DPO loss over pairs from summed sequence log-probabilities [B] each."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    metrics = {"reward_chosen": chosen_reward.mean().item(), "reward_rejected": rejected_reward.mean().item(),
               "margin": (chosen_reward - rejected_reward).mean().item(),
               "accuracy": (chosen_reward > rejected_reward).float().mean().item()}
    return losses.mean(), metrics


class DPOObjective:
    """The DPO loss of a PairBatch under a policy and its reference (model, adapters-off base, or
    cached sums). Knows nothing of optimizers or checkpoints: keel/rl/run.py's loop drives it."""

    def __init__(self, policy: torch.nn.Module, cfg: DPOConfig, reference: Optional[torch.nn.Module] = None):
        self.policy, self.cfg = policy, cfg
        self.reference = reference

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, cfg: DPOConfig) -> "DPOObjective":
        """The reference the config asks for: none (cached), the adapters-off base, or a frozen copy."""
        if cfg.reference == "cached" or has_lora(policy):
            return cls(policy, cfg)
        return cls(policy, cfg, copy.deepcopy(policy).eval().requires_grad_(False))

    def _reference_context(self):
        if self.reference is not None:
            return self.reference, contextlib.nullcontext()
        if has_lora(self.policy):
            return self.policy, adapters_disabled(self.policy)
        raise RuntimeError("DPO: no reference model and no cached reference log-probabilities")

    @torch.no_grad()
    def reference_scores(self, batch: PairBatch, full: bool = False):
        """(summed reference log-probs [2B], reference log-softmax [N, V] or None)."""
        model, ctx = self._reference_context()
        was_training = model.training
        model.eval()  # no dropout in the reference
        with ctx:
            token_logps, full_lp = response_logprobs(model, batch.input_ids, batch.response_mask, full)
        model.train(was_training)
        return token_logps.sum(-1), full_lp

    def loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        cached = self.cfg.reference == "cached"
        if cached and batch.ref_logps is None:
            raise RuntimeError("DPO: rl.dpo.reference is cached but the batch carries no reference log-probs")
        want_kl = not cached
        token_logps, policy_full = response_logprobs(self.policy, batch.input_ids, batch.response_mask, want_kl)
        policy_sums = token_logps.sum(-1)
        if cached:
            ref_sums, ref_full = batch.ref_logps.to(policy_sums.device), None
        else:
            ref_sums, ref_full = self.reference_scores(batch, full=True)
        b = batch.n_pairs
        loss, metrics = dpo_loss(policy_sums[:b], policy_sums[b:], ref_sums[:b], ref_sums[b:],
                                 self.cfg.beta, self.cfg.label_smoothing)
        metrics["loss"] = loss.item()
        metrics["logp_chosen"] = policy_sums[:b].mean().item()
        metrics["logp_rejected"] = policy_sums[b:].mean().item()
        metrics["response_tokens"] = int(batch.response_mask[:, 1:].sum())
        if ref_full is not None:
            metrics["kl_ref"] = full_vocab_kl(policy_full.detach(), ref_full).mean().item()
        return loss, metrics


# ---------------------------------------------------------------- the trainer (`keel rl`, rl.trainer: dpo)


def _pairs_of(cfg: DPOConfig):
    if cfg.pairs is not None:
        return load_pairs(cfg.pairs)
    b = cfg.build
    files = [f for name in b.corpora for f in corpus_files(name)]
    return pairs_from_documents(files, b.n_pairs, b.prompt_words, b.response_words, b.rejected, b.seed)


PER_TOKEN_METRICS = {"kl_ref"}  # means over a micro-batch's response tokens (the rest: over its pairs)


@register_rl_trainer("dpo", subsection=DPOConfig)
class DPOTrainer(RLRun):
    """Each step: pairs_per_step pairs (a seeded, resumable order) -> DPO loss in micro-batches of
    rl.micro_batch pairs -> one optimizer step. Held-out pairs give the eval metrics. Under torchrun
    each rank takes its share of the step's pairs (keel/rl/sharding.py); the update is one process's."""
    runs_sharded = True

    @classmethod
    def validate_config(cls, rl) -> None:
        if rl.dpo is None:
            raise ConfigError("rl.dpo: required for rl.trainer dpo (pairs or build, beta, reference, ...)")
        build_dpo_config(rl.dpo)

    def setup(self) -> None:
        self.dpo = build_dpo_config(self.rl.dpo)
        if self.ranks.sharded and self.dpo.lora is not None:
            raise ConfigError("rl.dpo.lora: adapters train on one process only for now; start without torchrun, or "
                              "drop rl.dpo.lora to train the sharded policy")
        if self.dpo.lora is not None:  # adapters only: the optimizer must see just them
            apply_lora(self.policy, self.dpo.lora, "rl.dpo.lora")
            self.optimizer, self.scheduler = adapter_optimizer(self.policy, self.cfg.optim,
                                                                self.total_steps * self.updates_per_step)
        pairs = _pairs_of(self.dpo)
        if self.dpo.reference == "cached" and not all(p.has_reference for p in pairs):
            pairs = self._cache_reference(pairs)
        order = list(range(len(pairs)))
        random.Random(self.cfg.train.seed).shuffle(order)
        n_eval = int(round(self.dpo.eval_fraction * len(pairs)))
        if len(pairs) - n_eval < 1:
            raise ConfigError(f"rl.dpo.eval_fraction: leaves no training pairs out of {len(pairs)}")
        self.eval_pairs = [pairs[i] for i in order[:n_eval]]
        self.pairs = PromptStream([pairs[i] for i in order[n_eval:]], self.cfg.train.seed)
        if self.ranks.sharded and self.dpo.reference != "cached":  # a frozen reference, sharded like the policy
            self.objective = DPOObjective(self.policy, self.dpo, self.load_model(self.rl.policy, trainable=False)[0])
        else:
            self.objective = DPOObjective.for_policy(self.policy, self.dpo)

    def _batches(self, pairs):
        size = self.rl.micro_batch
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            batch = tokenize_pairs(chunk, self.tokenizer, self.dpo.max_prompt_tokens, self.dpo.max_response_tokens,
                                   self.dpo.append_eos)
            batch.input_ids, batch.response_mask = batch.input_ids.to(self.device), batch.response_mask.to(self.device)
            yield len(chunk), batch

    def _my_batches(self, pairs) -> list:
        """(weight, pairs in it, batch) of this rank's micro-batches over its share of `pairs`; a rank
        short of pairs repeats pair 0 with weight 0 (every rank runs as many, for FSDP)."""
        share = self.ranks.share(len(pairs))
        mine = [(1, n, batch) for n, batch in self._batches(pairs[share.start:share.stop])]
        missing = self.ranks.micro_batch_count(len(pairs), self.rl.micro_batch) - len(mine)
        return mine + [(0, *next(self._batches(pairs[:1])))] * missing

    def _cache_reference(self, pairs):
        """The starting policy's (= the reference's) sums for every pair, computed once and kept in
        <run>/reference_logprobs.jsonl, which a resumed run reads instead of recomputing."""
        path = self.run_dir / "reference_logprobs.jsonl"
        if path.is_file():
            cached = load_pairs(path)
            if [(p.prompt, p.chosen, p.rejected) for p in cached] == [(p.prompt, p.chosen, p.rejected) for p in pairs]:
                return cached
        scorer = DPOObjective(self.policy, self.dpo, reference=self.policy)
        mine = []
        for weight, n, batch in self._my_batches(pairs):
            with adapters_disabled(self.policy), self.autocast():  # the precision the policy trains in
                sums, _ = scorer.reference_scores(batch)
            if weight:
                mine += [(float(sums[i]), float(sums[n + i])) for i in range(n)]
        out = [PreferencePair(p.prompt, p.chosen, p.rejected, chosen, rejected)
               for p, (chosen, rejected) in zip(pairs, self.ranks.gather(mine))]
        if self.ranks.is_main:
            save_pairs(out, path)
        self.ranks.barrier()
        return out

    def _run(self, pairs, train: bool) -> dict:
        totals: dict = {}
        for weight, n, batch in self._my_batches(pairs):
            with self.autocast():
                loss, metrics = self.objective.loss(batch)
            if train:  # this micro-batch's share of the step's mean; FSDP's average over ranks undone
                (loss * (weight * n / len(pairs) * self.ranks.dp_size)).backward()
            if not weight:
                continue
            tokens = metrics["response_tokens"]
            for key, value in metrics.items():  # per-pair means pair-weighted, per-token ones token-weighted
                weight = 1 if key == "response_tokens" else tokens if key in PER_TOKEN_METRICS else n / len(pairs)
                totals[key] = totals.get(key, 0.0) + value * weight
        totals = self.ranks.sum_dict(totals)
        for key in PER_TOKEN_METRICS.intersection(totals):
            totals[key] /= max(totals["response_tokens"], 1)
        return totals

    def train_step(self) -> dict:
        self.policy.train()
        row = self._run(self.pairs.take(self.dpo.pairs_per_step), train=True)
        row.update(self.optimizer_step())
        return row

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_pairs:
            return {}
        self.policy.eval()
        return {f"eval_{k}": v for k, v in self._run(self.eval_pairs, train=False).items()}

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.pairs.load_state_dict(state["pairs"])
