"""Policy-gradient losses and their helpers: PPO-clip with dual clip, KL to a reference, entropy,
and truncated importance weights between the rollout engine's and the trainer's logprobs.

Shapes: logprobs / old_logprobs / mask / is_weights are [B, T] over response tokens (mask True where
a token is a real response token), advantages [B]. Per-token terms become a loss by `rl.loss_agg`
(LOSS_AGGREGATIONS: token_mean by default, DAPO's); pass a LossScale with the whole mini-batch's
counts when a step is split into micro-batches or ranks.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from keel.errors import ConfigError

MAX_LOG_RATIO = 20.0  # exp() of a larger log-ratio overflows float32; clamping only touches garbage tokens


@dataclass
class PolicyLoss:
    fn: Callable
    options: dict


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, **options):
    def decorator(fn):
        POLICY_LOSSES[name] = PolicyLoss(fn, options)
        return fn
    return decorator


def _options(name: str, cfg, key: str = "rl.loss") -> dict:
    if name not in POLICY_LOSSES:
        close = difflib.get_close_matches(str(name), list(POLICY_LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown policy loss {name!r}{hint}; expected one of {sorted(POLICY_LOSSES)}")
    defaults = POLICY_LOSSES[name].options
    if cfg is None:
        return dict(defaults)
    if isinstance(cfg, Mapping):
        given = {k: v for k, v in cfg.items() if k != "name"}
        for k in given:
            if k not in defaults:
                close = difflib.get_close_matches(k, list(defaults), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{key}.{k}: not an option of loss {name!r}{hint}; expected some of {sorted(defaults)}")
        return {**defaults, **given}  # an explicit null is meaningful (dual_clip: null turns it off)
    if dataclasses.is_dataclass(cfg):  # a section may hold every loss's fields; None there means unset
        given = {k: getattr(cfg, k) for k in defaults if getattr(cfg, k, None) is not None}
        return {**defaults, **given}
    raise ConfigError(f"{key}: expected a mapping of loss options, got {type(cfg).__name__}")


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor, token_count: Optional[float] = None) -> torch.Tensor:
    denominator = mask.sum() if token_count is None else torch.as_tensor(token_count, dtype=values.dtype)
    return (values * mask).sum() / denominator.clamp_min(1)


@dataclass
class LossScale:
    """What a micro-batch's sums are divided by, counted over the whole mini-batch (every micro-batch
    and rank), so that split or not the gradient is the same. None: this batch's own count."""
    tokens: Optional[float] = None  # valid response tokens
    sequences: Optional[float] = None  # responses
    horizon: Optional[float] = None  # the longest a response may be (rl.sampling.max_tokens)


def _token_mean(values, mask, scale: LossScale):
    tokens = mask.sum() if scale.tokens is None else torch.as_tensor(scale.tokens, dtype=values.dtype)
    return (values * mask).sum() / tokens.clamp_min(1)


def _seq_mean_token_mean(values, mask, scale: LossScale):
    per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_sequence.sum() / (scale.sequences or values.shape[0])


def _seq_mean_token_sum_norm(values, mask, scale: LossScale):
    per_sequence = (values * mask).sum(-1) / (scale.horizon or values.shape[-1])
    return per_sequence.sum() / (scale.sequences or values.shape[0])


# How per-token terms become one loss (`rl.loss_agg`). token_mean: every token of the batch weighs the
# same, so long responses weigh by their length (DAPO). seq_mean_token_mean: each response weighs the
# same (GRPO as first published; long responses' tokens count less). seq_mean_token_sum_norm: token sums
# over a fixed horizon (Dr. GRPO: no length bias in either direction).
LOSS_AGGREGATIONS: dict[str, Callable] = {"token_mean": _token_mean, "seq_mean_token_mean": _seq_mean_token_mean,
                                          "seq_mean_token_sum_norm": _seq_mean_token_sum_norm}


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean",
              scale: Optional[LossScale] = None) -> torch.Tensor:
    return LOSS_AGGREGATIONS[agg](values, mask, scale or LossScale())


def policy_loss(name: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cfg=None, is_weights: Optional[torch.Tensor] = None, *,
                ref_logprobs: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                token_count: Optional[float] = None, agg: str = "token_mean",
                scale: Optional[LossScale] = None) -> tuple[torch.Tensor, dict]:
    """(scalar loss, metrics). Adds kl_coef * KL(policy || reference) when `ref_logprobs` is given and
    subtracts entropy_coef * entropy when `entropy` ([B, T], e.g. from entropy_from_logits) is. Every
    term is aggregated by `agg` (LOSS_AGGREGATIONS) over `scale` (token_count: shorthand for
    LossScale(tokens=token_count))."""
    options = _options(name, cfg)
    kl_coef, kl_kind, entropy_coef = options.pop("kl_coef"), options.pop("kl_kind"), options.pop("entropy_coef")
    mask = mask.bool()
    scale = scale or LossScale(tokens=token_count)
    per_token, metrics = POLICY_LOSSES[name].fn(logprobs, old_logprobs.detach(), advantages.detach(), mask, **options)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate(per_token, mask, agg, scale)
    metrics["loss/policy"] = float(loss.detach())
    if ref_logprobs is not None and kl_coef:
        kl = aggregate(kl_penalty(logprobs, ref_logprobs.detach(), mask, kl_kind), mask, agg, scale)
        loss = loss + kl_coef * kl
        metrics["loss/kl"] = float(kl.detach())
    if entropy is not None:
        ent = aggregate(entropy, mask, agg, scale)
        if entropy_coef:
            loss = loss - entropy_coef * ent
        metrics["policy/entropy"] = float(ent.detach())
    return loss, metrics


@register_policy_loss("ppo_clip", clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                      kl_coef=0.0, kl_kind="k3", entropy_coef=0.0)
def ppo_clip(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip):
    """PPO's clipped surrogate with an asymmetric range [1 - clip_low, 1 + clip_high] (DAPO's
    clip-higher) and dual clip: for A < 0 the loss is capped at -A * dual_clip, so a token whose
    ratio exploded cannot dominate the step (Ye et al. 2020). dual_clip None or 0 turns it off.
    Defaults are GoLongRL's (0.2 / 0.28 / 3.0)."""
    dual_clip = dual_clip or None
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"rl.loss.dual_clip: must be > 1 (or null), got {dual_clip}")
    adv = advantages.reshape(-1, 1).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    n = mask.sum().clamp_min(1)
    with torch.no_grad():
        metrics = {
            "clip_fraction": float(((clipped > unclipped) & mask).sum() / n),
            "dual_clip_fraction": float((dual_active & mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "approx_kl": float((-log_ratio * mask).sum() / n),  # k1 estimate of KL(old || new)
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on sampled tokens, zero outside `mask`.
    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2; k3 = q/p - log(q/p) - 1
    (unbiased, non-negative, low variance; Schulman 2020)."""
    log_ratio = (logprobs - ref_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio ** 2
    elif kind == "k3":
        kl = (torch.exp(-log_ratio) + log_ratio - 1).clamp(max=10.0)  # verl's bound: one token cannot swamp a step
    else:
        raise ConfigError(f"rl.loss.kl_kind: unknown KL estimator {kind!r}; expected one of ['k1', 'k2', 'k3']")
    return kl * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap=2.0, veto: Optional[float] = None, low_mode: str = "clip") -> tuple[torch.Tensor, dict]:
    """Token-level truncated importance weights pi_trainer / pi_rollout (detached), correcting for the
    rollout engine sampling from slightly different numerics than the trainer.

    `cap` is the upper bound, or a (low, high) pair (GoLongRL clips to [0.5, 5.0]). Below `low`,
    low_mode "clip" lifts a weight up to low; "mask" sets it to 0 (the token leaves the gradient: a
    token the trainer finds far less likely than the engine did is treated as a mismatch, not
    up-weighted). `veto`: a
    sequence with any token ratio below it gets weight 0 (verl's catastrophic-mismatch veto; GoLongRL
    uses 1e-4). Weights are 0 outside `mask`. Metrics (unprefixed; the trainer logs them under is/):
    is/weight_mean / is/weight_max over valid tokens, is/fraction_capped, is/veto_fraction (grouped
    under is/ in metrics.jsonl and wandb, so a dashboard shows them together).
    """
    low, high = (cap if isinstance(cap, (tuple, list)) else (0.0, cap))
    if not 0.0 <= low < high:
        raise ConfigError(f"rl.is_cap: expected a cap > 0 or a (low, high) pair with 0 <= low < high, got {cap!r}")
    mask = mask.bool()
    with torch.no_grad():
        log_ratio = (trainer_logprobs - rollout_logprobs).float().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        raw = torch.exp(log_ratio)
        if low_mode not in ("clip", "mask"):
            raise ConfigError(f"rl.is_low_mode: expected clip or mask, got {low_mode!r}")
        weights = raw.clamp(low, high)
        if low_mode == "mask":
            weights = torch.where(raw < low, torch.zeros_like(weights), weights)
        capped = ((raw > high) | (raw < low)) & mask
        metrics = {}
        if veto is not None:
            vetoed = ((raw < veto) & mask).any(dim=-1, keepdim=True)
            weights = torch.where(vetoed, torch.zeros_like(weights), weights)
            metrics["is/veto_fraction"] = float(vetoed.float().mean())
        weights = weights * mask
        n = mask.sum().clamp_min(1)
        metrics.update({
            "is/weight_mean": float(weights.sum() / n),
            "is/weight_max": float(weights.max()) if mask.any() else 0.0,
            "is/fraction_capped": float(capped.sum() / n),
        })
    return weights, metrics
