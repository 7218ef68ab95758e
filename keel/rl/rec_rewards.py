"""Rewards of recommender RL (keel/rl/rec_rl.py): what a user row's G recommended items earn.

A reward is registered with `@register_rec_reward(name, **options)` and called as
fn(view, items, codes, generator, **options) -> float [B, G], with NaN where the reward has nothing to
say about an item (no logged feedback, not among the K picked for the format check): such items get
advantage 0 and do not enter the estimator's statistics. `rl.rec.rewards` names the rewards and
their weights; several are summed (NaN only where all of them are NaN).

- feedback: the user's own logged feedback on the item, shaped by OneRec-V2's duration-aware
  quantile (keel/rl/rec_objectives.py): the item's engagement ranked among the user's earlier
  engagements with items of the same duration bucket; -1 for an explicit dislike. Only items the
  user interacted with after the sample's position (inside the training part of the log) have
  feedback. Engagement is the log's play_time where it has one, else the rating (MovieLens has no
  watch time: the rating stands in for it, and every item gets duration 1, so one bucket); an
  explicit dislike is a rating <= `dislike_rating`.
- format: OneRec-V1's legality reward for unconstrained rollouts: K of the G items picked at random,
  1 where the generated SID is a catalogue item, 0 where it is not; the others NaN.
- reward_model: a ranker trained by keel on the same log (`model.name: ranker`, keel/model/ranker.py)
  scores each item for the row's context: sum over `objectives` of weight x P(objective), e.g.
  {like: 1.0} = P(the user picks the item and rates it >= 4). Known for every catalogue item, so it
  also rewards items the log never showed the user; NaN for a code path that is no item.

A reward may register a `check(options, task)` that runs once at setup (before any rollout) and
refuses bad options with a one-line ConfigError.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from keel.checkpoint.files import resolve_checkpoint
from keel.checkpoint.model_io import checkpoint_model_config, checkpoint_recipe, load_model
from keel.data.recsys import LeaveOneOutSplit
from keel.errors import ConfigError, KeelError
from keel.rl.rec_objectives import duration_quantile_rewards

REC_REWARDS: dict[str, tuple[Callable, dict]] = {}
REC_REWARD_CHECKS: dict[str, Callable] = {}


def register_rec_reward(name: str, check: Callable | None = None, **options):
    def decorator(fn):
        REC_REWARDS[name] = (fn, options)
        if check is not None:
            REC_REWARD_CHECKS[name] = check
        return fn
    return decorator


def check_rec_rewards(options: dict[str, dict], task) -> None:
    """Each used reward's setup-time check of its options against the task (its log and items)."""
    for name, given in options.items():
        if name in REC_REWARD_CHECKS:
            REC_REWARD_CHECKS[name](given, task)


def rec_reward_options(name: str, given: dict | None) -> dict:
    if name not in REC_REWARDS:
        close = difflib.get_close_matches(str(name), list(REC_REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"rl.rec.rewards: unknown reward {name!r}{hint}; expected some of {sorted(REC_REWARDS)}")
    defaults = REC_REWARDS[name][1]
    given = dict(given or {})
    for key in given:
        if key not in defaults:
            raise ConfigError(f"rl.rec.reward_cfg.{name}.{key}: not an option of reward {name!r}; "
                              f"expected some of {sorted(defaults)}")
    return {**defaults, **given}


def engagement_of(split: LeaveOneOutSplit) -> np.ndarray:
    """Per sorted-log position: the play time where the log has one, else the rating."""
    log = split.log
    if log.play_time is not None:
        return log.play_time[split.order].astype(np.float64)
    return split.ratings.astype(np.float64)


def duration_of(split: LeaveOneOutSplit) -> np.ndarray:
    """Per sorted-log position: the item's duration where the log has one, else 1 (one bucket)."""
    log = split.log
    if log.duration is not None:
        return log.duration[split.order].astype(np.float64)
    return np.ones(len(split.items))


@dataclass
class UserView:
    """What the log knows about each rollout row: the sorted-log position of its sample and its user."""
    split: LeaveOneOutSplit
    positions: np.ndarray  # int64 [B]: the row's first target position (its context ends just before)
    users: np.ndarray  # int64 [B]


@register_rec_reward("feedback", beta=2.0, dislike_rating=2)
def feedback(view: UserView, items: torch.Tensor, codes, generator, *, beta, dislike_rating):
    s = view.split
    engagement, duration = engagement_of(s), duration_of(s)
    has_rating = s.log.rating is not None
    rows, cols, hist_lengths, hist_pos, seen_pos = [], [], [], [], []
    item_rows = items.cpu().numpy()
    for b, (p, u) in enumerate(zip(view.positions.tolist(), view.users.tolist())):
        future = np.arange(p, s.train_end[u])
        first_seen = {}
        for q in future[::-1]:  # the first interaction after p wins
            first_seen[int(s.items[q])] = int(q)
        history = np.arange(s.ptr[u], p)  # what the user's engagement is ranked against
        for g, item in enumerate(item_rows[b].tolist()):
            q = first_seen.get(item) if item else None
            if q is None:
                continue
            rows.append(b), cols.append(g), seen_pos.append(q)
            hist_lengths.append(len(history)), hist_pos.append(history)
    out = torch.full(items.shape, float("nan"))
    if not rows:
        return out
    hist = np.concatenate(hist_pos).astype(np.int64)
    seen = np.asarray(seen_pos)
    negative = (s.ratings[seen] <= dislike_rating) if has_rating else np.zeros(len(seen), bool)
    q = duration_quantile_rewards(torch.from_numpy(np.concatenate([[0], np.cumsum(hist_lengths)])),
                                  torch.from_numpy(duration[hist]), torch.from_numpy(engagement[hist]),
                                  torch.from_numpy(duration[seen]), torch.from_numpy(engagement[seen]),
                                  torch.from_numpy(negative), beta)
    out[torch.tensor(rows), torch.tensor(cols)] = q
    return out


@register_rec_reward("format", k=8)
def format_reward(view: UserView, items: torch.Tensor, codes, generator, *, k):
    if k < 1:
        raise ConfigError(f"rl.rec.reward_cfg.format.k: expected >= 1 items checked per user, got {k}")
    b, g = items.shape
    out = torch.full(items.shape, float("nan"))
    picked = torch.rand(b, g, generator=generator).argsort(1)[:, :min(k, g)]
    legal = (items.cpu() != 0).float()
    return out.scatter_(1, picked, legal.gather(1, picked))


def context_of(split: LeaveOneOutSplit, positions: np.ndarray, users: np.ndarray,
               context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded context items and their ratings [B, context_len] of each sample, as RecSamples
    cuts them: the user's interactions just before its sorted-log position (for a reward model whose
    context length differs from the policy's)."""
    items, ratings = np.zeros((2, len(positions), context_len), np.int64)
    for row, (p, u) in enumerate(zip(positions.tolist(), users.tolist())):
        start = max(int(split.ptr[u]), p - context_len)
        items[row, context_len - (p - start):] = split.items[start:p]
        ratings[row, context_len - (p - start):] = split.ratings[start:p]
    return torch.from_numpy(items), torch.from_numpy(ratings)


_RANKERS: dict[str, torch.nn.Module] = {}  # checkpoint folder -> loaded ranker (loaded once per process)


def _ranker(path) -> torch.nn.Module:
    ckpt = str(resolve_checkpoint(path))
    if ckpt not in _RANKERS:
        _RANKERS[ckpt] = load_model(ckpt, "cpu").requires_grad_(False)
    return _RANKERS[ckpt]


def _check_reward_model(options: dict, task) -> None:
    key, path = "rl.rec.reward_cfg.reward_model", options["path"]
    if not path:
        raise ConfigError(f"{key}.path: required: a `keel train` run of a ranker recipe "
                          f"(e.g. recipes/recsys/ranker-tiny.yaml) on the policy's data")
    try:
        ckpt = resolve_checkpoint(path)
    except KeelError as e:
        raise ConfigError(f"{key}.path: {e}") from None
    model_cfg = checkpoint_model_config(ckpt)
    if model_cfg.name != "ranker":
        raise ConfigError(f"{key}.path: {path} holds a {model_cfg.name!r} model; expected a ranker (model.name: ranker)")
    dataset = (checkpoint_recipe(ckpt).get("recsys") or {}).get("dataset")
    if dataset != task.rec.dataset or model_cfg.n_items != task.log.n_items:
        raise ConfigError(f"{key}.path: the ranker was trained on {dataset} ({model_cfg.n_items} items), the policy "
                          f"on {task.rec.dataset} ({task.log.n_items} items); train a ranker on the policy's data")
    weights = options["objectives"]
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{key}.objectives: expected a mapping objective -> weight, e.g. {{like: 1.0}}")
    for name, weight in weights.items():
        if name not in model_cfg.objectives:
            raise ConfigError(f"{key}.objectives: {name!r} is not a head of this ranker; it has {model_cfg.objectives}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{key}.objectives.{name}: expected a number, got {weight!r}")


@register_rec_reward("reward_model", check=_check_reward_model, path=None, objectives={"like": 1.0})
def reward_model(view: UserView, items: torch.Tensor, codes, generator, *, path, objectives):
    ranker = _ranker(path)
    names = ranker.config.objectives
    context, ratings = context_of(view.split, view.positions, view.users, ranker.config.context_len)
    with torch.no_grad():
        probs = torch.sigmoid(ranker.scores(context, ratings, items.cpu().clamp(min=0)))
    value = sum(float(weight) * probs[..., names.index(name)] for name, weight in objectives.items())
    return torch.where(items.cpu() != 0, value, torch.full_like(value, float("nan")))


def combined_rewards(weights: dict, options: dict, view: UserView, items, codes, generator) -> torch.Tensor:
    """sum_r w_r * r over the named rewards, NaN where every reward is NaN."""
    total, seen = torch.zeros(items.shape), torch.zeros(items.shape, dtype=torch.bool)
    for name, weight in weights.items():
        fn, _ = REC_REWARDS[name]
        value = fn(view, items, codes, generator, **options[name])
        known = ~torch.isnan(value)
        total = total + torch.where(known, weight * value, torch.zeros_like(value))
        seen |= known
    return torch.where(seen, total, torch.full_like(total, float("nan")))
