"""Recommender RL objectives of OneRec (V1 §3.2, V2 §3.3): ECPO and GBPO policy losses, and
OneRec-V2's duration-aware reward shaping as a reward (a same-bucket playtime quantile) plus an
advantage estimator (+1 / -1 / 0, no normalisation).

A rollout is one recommended item: its response tokens are the item's semantic-ID codes, so
logprobs are [B, L] over the L codes. `ratio: item` (default) takes pi as the item's probability,
the product over its codes (the sequence is what is exposed and rewarded); `ratio: token` applies the
loss to each code's own probability, as the paper's per-token gradient analysis reads. The paper is
ambiguous between the two; both are keys. With `ratio: item` the item's loss stands on each of its
codes, so `rl.loss_agg: seq_mean_token_mean` (or token_mean, every SID having L codes) is the mean
over items.
"""
from __future__ import annotations

import math

import torch

from keel.errors import ConfigError
from keel.rl.advantages import register_estimator
from keel.rl.losses import MAX_LOG_RATIO, register_policy_loss

RATIOS = ("item", "token")


def _item_or_token(logprobs, old_logprobs, mask, ratio: str):
    """(log pi, log pi_old) per item [B, 1] or per token [B, L], zero outside the mask."""
    if ratio not in RATIOS:
        raise ConfigError(f"rl.loss.ratio: expected one of {list(RATIOS)}, got {ratio!r}")
    logprobs, old_logprobs = logprobs * mask, old_logprobs * mask
    if ratio == "item":
        return logprobs.sum(-1, keepdim=True), old_logprobs.sum(-1, keepdim=True)
    return logprobs, old_logprobs


def _spread(per_unit: torch.Tensor, mask: torch.Tensor, ratio: str) -> torch.Tensor:
    """[B, L] per-token loss: an item's loss stands on each of its codes, so a mean over its codes (or,
    with the fixed L of semantic IDs, over all tokens) is the item's loss and its gradient."""
    if ratio == "token":
        return per_unit
    return per_unit.expand_as(mask) * mask


@register_policy_loss("ecpo", epsilon=0.2, delta=0.1, ratio="item", kl_coef=0.0, kl_kind="k3", entropy_coef=0.0)
def ecpo(logprobs, old_logprobs, advantages, mask, *, epsilon, delta, ratio):
    """Early-Clipped GRPO (OneRec-V1): PPO's clipped surrogate with the old policy lifted to
    pi'_old = max(sg(pi) / (1 + epsilon + delta), pi_old), so a sample the old policy found far less
    likely than the current one has its ratio capped at 1 + epsilon + delta before clipping, and a
    negative advantage cannot push through a huge ratio."""
    if epsilon <= 0 or delta < 0:
        raise ConfigError(f"rl.loss: ecpo needs epsilon > 0 and delta >= 0, got {epsilon}, {delta}")
    logp, old = _item_or_token(logprobs, old_logprobs, mask, ratio)
    old_lifted = torch.maximum(logp.detach() - math.log(1 + epsilon + delta), old)
    rho = torch.exp((logp - old_lifted).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = advantages.reshape(-1, 1).to(rho.dtype)
    surrogate = torch.minimum(rho * adv, rho.clamp(1 - epsilon, 1 + epsilon) * adv)
    with torch.no_grad():
        lifted = (old_lifted > old).float().mean()
        clipped = ((rho - rho.clamp(1 - epsilon, 1 + epsilon)).abs() > 0).float().mean()
    metrics = {"early_clip_fraction": float(lifted), "clip_fraction": float(clipped),
               "ratio_mean": float(rho.detach().mean())}
    return _spread(-surrogate, mask, ratio), metrics


@register_policy_loss("gbpo", ratio="item", kl_coef=0.0, kl_kind="k3", entropy_coef=0.0)
def gbpo(logprobs, old_logprobs, advantages, mask, *, ratio):
    """Gradient-Bounded Policy Optimization (OneRec-V2): loss -pi / pi'_old * A with no ratio clip,
    pi'_old = max(pi_old, sg(pi)) for A >= 0 and max(pi_old, 1 - sg(pi)) for A < 0. A negative
    sample's gradient is then A * grad(pi) / max(pi_old, 1 - pi), bounded as pi -> 0 (the BCE
    negative gradient) where the plain policy gradient A * grad(pi) / pi is not. Where pi_old is
    unknown (samples from another pipeline) pass old_logprobs = logprobs: the ratio is then 1 for
    positives."""
    logp, old = _item_or_token(logprobs, old_logprobs, mask, ratio)
    adv = advantages.reshape(-1, 1).to(logp.dtype)
    pi = torch.exp(logp.detach())
    pi_old = torch.exp(old)
    denominator = torch.where(adv >= 0, torch.maximum(pi_old, pi), torch.maximum(pi_old, 1 - pi))
    # pi / denominator with the gradient of pi: exp(logp) keeps it in log space until here.
    ratio_term = torch.exp(logp.clamp(max=0.0)) / denominator.clamp_min(1e-30)
    with torch.no_grad():
        metrics = {"ratio_mean": float(ratio_term.mean()),
                   "negative_bounded_fraction": float(((adv < 0) & (1 - pi > pi_old)).float().mean())}
    return _spread(-ratio_term * adv, mask, ratio), metrics


# ------------------------------------------------------------------ duration-aware reward shaping

def duration_bucket(duration: torch.Tensor, beta: float, eps: float = 1e-6) -> torch.Tensor:
    """F(d) = floor(log_beta(d + eps)): items of similar length share a bucket (beta > 1)."""
    if beta <= 1:
        raise ConfigError(f"rl.reward.beta: the log base of duration buckets must be > 1, got {beta}")
    return torch.floor(torch.log(duration.double() + eps) / math.log(beta)).long()


def duration_quantile_rewards(hist_indptr: torch.Tensor, hist_duration: torch.Tensor, hist_playtime: torch.Tensor,
                              duration: torch.Tensor, playtime: torch.Tensor, negative: torch.Tensor,
                              beta: float) -> torch.Tensor:
    """OneRec-V2's per-sample engagement score: q_i = |{p_j in P_{u,b} : p_j <= p_i}| / |P_{u,b}| over the
    playtimes P_{u,b} of the user's history items in the target's duration bucket b. Rollout i's history
    is hist_*[hist_indptr[i]:hist_indptr[i+1]]. Returns q in [0, 1], -1 where `negative` (an explicit
    dislike), and 0 where the user has no history in the bucket (nothing to compare with: never
    rewarded). Vectorised over all samples and history entries."""
    n = duration.shape[0]
    lengths = hist_indptr[1:] - hist_indptr[:-1]
    owner = torch.repeat_interleave(torch.arange(n), lengths)
    same = duration_bucket(hist_duration, beta) == duration_bucket(duration, beta)[owner]
    below = same & (hist_playtime <= playtime[owner])
    in_bucket = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, same.double())
    at_most = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, below.double())
    q = torch.where(in_bucket > 0, at_most / in_bucket.clamp_min(1), torch.zeros_like(in_bucket))
    return torch.where(negative.bool(), torch.full_like(q, -1.0), q).float()


@register_estimator("duration_aware", quantile=0.75, strict=True)
def duration_aware(rewards, group, tasks, state, *, quantile, strict):
    """A = +1 where q is above the batch's `quantile` cut (top quartile by default) and the sample has
    no negative feedback, -1 for explicit negatives (reward -1 from duration_quantile_rewards), 0
    otherwise (filtered out). No further normalisation (OneRec-V2 §3.3). `strict: false` counts q equal
    to the cut as above it: with coarse engagement (5 rating levels) many q tie at 1, the cut is often
    1 itself, and the paper's strict q > cut would reward nothing."""
    if not 0 < quantile < 1:
        raise ConfigError(f"rl.advantage.quantile: expected a value in (0, 1), got {quantile}")
    negative = rewards < 0
    scored = rewards[~negative]
    threshold = torch.quantile(scored.float(), quantile) if scored.numel() else torch.tensor(math.inf)
    above = rewards > threshold if strict else rewards >= threshold
    adv = torch.where(above & ~negative, torch.ones_like(rewards), torch.zeros_like(rewards))
    adv = torch.where(negative, -torch.ones_like(rewards), adv)
    state.setdefault("metrics", {}).update({"advantage/threshold": float(threshold),
                                            "advantage/positive_fraction": float((adv > 0).float().mean()),
                                            "advantage/negative_fraction": float(negative.float().mean())})
    return adv
