"""Ranking metrics for next-item recommendation: HR@K and NDCG@K from score matrices.

Full ranking: every item 1..n_items competes with the single target (column 0, padding, never does).
Ties are counted pessimistically: the target's rank is the number of OTHER items scoring >= it, so
a constant scorer gets the worst rank rather than a lucky one, and no metric depends on item order.
With history masking, the user's known items (keel.data.recsys history CSR) score -inf, the target
never. Metrics come per user, so callers average over users, bootstrap over users, or over seeds.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); beyond that the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def mask_history(scores: torch.Tensor, users: torch.Tensor, history: tuple[np.ndarray, np.ndarray],
                 targets: torch.Tensor) -> torch.Tensor:
    """A copy of `scores` [B, n_items + 1] with each row's known items (history CSR (indptr, items)
    indexed by user) set to -inf, except the row's target."""
    indptr, items = history
    users_np = users.cpu().numpy()
    starts, lengths = indptr[users_np], indptr[users_np + 1] - indptr[users_np]
    rows = np.repeat(np.arange(len(users_np)), lengths)
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    cols = items[np.repeat(starts - before, lengths) + np.arange(len(rows))]
    out = scores.clone()
    keep = out.gather(1, targets.view(-1, 1))
    out[torch.from_numpy(rows).to(out.device), torch.from_numpy(cols).to(out.device)] = -math.inf
    out.scatter_(1, targets.view(-1, 1), keep)
    return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each row's target among items 1..n_items (column 0 ignored)."""
    real = scores[:, 1:]
    target_score = scores.gather(1, targets.view(-1, 1))
    ranks = (real >= target_score).sum(1) - 1  # the target itself is one of the >=
    return torch.where(target_score.squeeze(1).isnan(), real.shape[1] - 1, ranks)  # NaN: last


def hr_ndcg(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user HR@k (target in the top k) and NDCG@k (1/log2(rank + 2) there, single target)."""
    ranks = np.asarray(ranks)
    hit = ranks < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def ranking_metrics(ranks: np.ndarray, topk: Iterable[int]) -> dict[str, np.ndarray]:
    """{"hr@K": per-user array, "ndcg@K": ...} for every K."""
    out = {}
    for k in topk:
        out[f"hr@{k}"], out[f"ndcg@{k}"] = hr_ndcg(ranks, k)
    return out


def evaluate_scorer(score_fn, batches, topk: Iterable[int] = (5, 10, 20),
                    history: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-user metrics of `score_fn(batch) -> [B, n_items + 1]` over eval batches (the first target
    of each row; padding rows, user 0, skipped). `history` given: known items are masked."""
    ranks = []
    for batch in batches:
        real = batch["user"] != 0
        if not real.any():
            continue
        scores = score_fn(batch).float()
        users, targets = batch["user"][real], batch["targets"][real, 0]
        scores = scores[real.to(scores.device)]
        targets = targets.to(scores.device)
        if history is not None:
            scores = mask_history(scores, users, history, targets)
        ranks.append(target_ranks(scores, targets).cpu().numpy())
    return ranking_metrics(np.concatenate(ranks) if ranks else np.zeros(0, np.int64), topk)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean over users, seeded."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)


def seeds_summary(means: Iterable[float]) -> dict[str, float]:
    """Mean over seeds with its standard deviation and 95% Student-t interval (n >= 2)."""
    x = np.asarray(list(means), dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "std": 0.0, "low": mean, "high": mean, "n": len(x)}
    std = float(x.std(ddof=1))
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else 1.96
    half = t * std / math.sqrt(len(x))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": len(x)}
