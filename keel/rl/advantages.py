"""Advantage estimators: sequence rewards of N rollouts -> one advantage per rollout.

`compute_advantages(name, rewards[N], group[N], tasks, cfg, state)`: `group` says which prompt each
rollout answers, `tasks` its task (the key TMN-Reweight scales by). `state` is a plain dict the trainer
checkpoints; estimators may keep statistics there across steps (those here are stateless and only
leave their diagnostics in state["metrics"]). OneRec-V2's `duration_aware` registers from
keel/rl/rec_objectives.py.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from keel.errors import ConfigError


@dataclass
class Estimator:
    fn: Callable
    options: dict  # option name -> default


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {}
# Short names a recipe may use for the reference's hyperparameter names.
ALIASES = {"eps": "epsilon", "difficulty_alpha": "difficulty_smooth_alpha"}


def register_estimator(name: str, **options):
    def decorator(fn):
        ADVANTAGE_ESTIMATORS[name] = Estimator(fn, options)
        return fn
    return decorator


def estimator_options(name: str, cfg, key: str = "rl.advantage") -> dict:
    """Defaults overridden by `cfg` (a mapping, a dataclass, or None). Unknown keys of a mapping are
    errors; a dataclass section may hold options of other estimators too, so only this one's are read."""
    if name not in ADVANTAGE_ESTIMATORS:
        close = difflib.get_close_matches(str(name), list(ADVANTAGE_ESTIMATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown advantage estimator {name!r}{hint}; "
                          f"expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    defaults = ADVANTAGE_ESTIMATORS[name].options
    if cfg is None:
        return dict(defaults)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
        given = {ALIASES.get(k, k): v for k, v in cfg.items() if ALIASES.get(k, k) in defaults}
    elif isinstance(cfg, Mapping):
        given = {ALIASES.get(k, k): v for k, v in cfg.items() if k != "name"}
        for k in given:
            if k not in defaults:
                close = difflib.get_close_matches(k, list(defaults), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{key}.{k}: not an option of estimator {name!r}{hint}; "
                                  f"expected some of {sorted(defaults)}")
    else:
        raise ConfigError(f"{key}: expected a mapping of estimator options, got {type(cfg).__name__}")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def compute_advantages(name: str, rewards: torch.Tensor, group: torch.Tensor, tasks: list[str],
                       cfg=None, state: dict | None = None) -> torch.Tensor:
    options = estimator_options(name, cfg)
    rewards = rewards.detach().to(torch.float32).reshape(-1)
    group = torch.as_tensor(group).reshape(-1)
    if group.numel() != rewards.numel() or len(tasks) != rewards.numel():
        raise ValueError(f"rewards ({rewards.numel()}), group ({group.numel()}) and tasks ({len(tasks)}) differ in length")
    state = {} if state is None else state
    return ADVANTAGE_ESTIMATORS[name].fn(rewards, group, list(tasks), state, **options)


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """(inverse index, size, mean, unbiased var) per group; size-1 groups get mean 0, var 1 (verl's rule)."""
    _, inv = torch.unique(group.to(rewards.device), return_inverse=True)
    n_groups = int(inv.max()) + 1
    size = torch.bincount(inv, minlength=n_groups).to(rewards.dtype)
    mean = rewards.new_zeros(n_groups).index_add_(0, inv, rewards) / size
    sq_dev = (rewards - mean[inv]) ** 2
    var = rewards.new_zeros(n_groups).index_add_(0, inv, sq_dev) / (size - 1).clamp_min(1)
    single = size <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    var = torch.where(single, torch.ones_like(var), var)
    return inv, size, mean, var, single


@register_estimator("grpo", epsilon=1e-6, norm_by_std=True, singleton="zero")
def grpo(rewards, group, tasks, state, *, epsilon, norm_by_std, singleton):
    """A_i = (r_i - mean_g) / (std_g + eps) (std unbiased), or r_i - mean_g with norm_by_std=False
    (Dr. GRPO). A prompt with one rollout has no baseline: `singleton="zero"` gives it 0 advantage;
    "reference" keeps verl's mean 0 / std 1, i.e. A = r / (1 + eps)."""
    _check_singleton(singleton)
    inv, size, mean, var, single = _group_stats(rewards, group)
    centred = rewards - mean[inv]
    adv = centred / (var.sqrt()[inv] + epsilon) if norm_by_std else centred
    if singleton == "zero":
        adv = torch.where(single[inv], torch.zeros_like(adv), adv)
    state["metrics"] = {"adv/zero_std_groups": float(((var == 0) & ~single).sum())}
    return adv


@register_estimator("tmn_reweight", epsilon=1e-6, norm_adv_by_task_scale=True, difficulty_reweight=True,
                     difficulty_gamma=1.0, difficulty_smooth_alpha=0.8, singleton="reference")
def tmn_reweight(rewards, group, tasks, state, *, epsilon, norm_adv_by_task_scale, difficulty_reweight,
                 difficulty_gamma, difficulty_smooth_alpha, singleton):
    """GoLongRL's TMN-Reweight (docs/grpo.md#tmn-reweight-estimator; verl `compute_tmn_grpo_outcome_advantage`).

    Centre per prompt, scale per task:  A_i = (r_i - mu_g) / (s_t + eps),  s_t = sqrt(mean_{g in t} var_g).
    Difficulty reweight: pass rate p_g = fraction of the group above a smoothed mean
    alpha * mu_g + (1 - alpha) * m_t (m_t = mean of mu_g over the task's prompts; size-1 groups use
    m_t); positives (r_i > mu_g, the unsmoothed mean) get exp(gamma (0.5 - p_g)), the rest
    exp(gamma (p_g - 0.5)); no clamp. alpha = 0.8 is the released script's value (code default 0.5);
    gamma = 1.0 the code default. Size-1 groups follow the reference (mu 0, var 1, so A = r / s_t)
    unless `singleton="zero"`.
    """
    _check_singleton(singleton)
    inv, size, mean, var, single = _group_stats(rewards, group)
    n_groups = mean.numel()
    task_names = sorted(set(tasks))
    task_index = {t: k for k, t in enumerate(task_names)}
    task_of_rollout = torch.tensor([task_index[t] for t in tasks], device=rewards.device)
    group_task = torch.full((n_groups,), -1, dtype=torch.long, device=rewards.device)
    group_task[inv] = task_of_rollout
    if not bool((group_task[inv] == task_of_rollout).all()):  # a prompt has one task; else a trainer bug
        raise ValueError("tmn_reweight: rollouts of one prompt carry different tasks")
    n_tasks = len(task_names)
    groups_per_task = torch.bincount(group_task, minlength=n_tasks).to(rewards.dtype).clamp_min(1)
    task_scale = (rewards.new_zeros(n_tasks).index_add_(0, group_task, var) / groups_per_task).sqrt()

    centred = rewards - mean[inv]
    adv = centred / (task_scale[task_of_rollout] + epsilon) if norm_adv_by_task_scale else centred
    metrics = {f"adv/task_scale/{t}": float(task_scale[k]) for k, t in enumerate(task_names)}
    if difficulty_reweight:
        task_mean = rewards.new_zeros(n_tasks).index_add_(0, group_task, mean) / groups_per_task
        smoothed = difficulty_smooth_alpha * mean + (1 - difficulty_smooth_alpha) * task_mean[group_task]
        smoothed = torch.where(single, task_mean[group_task], smoothed)
        passed = (rewards > smoothed[inv]).to(rewards.dtype)
        pass_rate = rewards.new_zeros(n_groups).index_add_(0, inv, passed) / size
        w_pos = torch.exp(difficulty_gamma * (0.5 - pass_rate))
        w_neg = torch.exp(difficulty_gamma * (pass_rate - 0.5))
        adv = adv * torch.where(rewards > mean[inv], w_pos[inv], w_neg[inv])
        metrics["adv/mean_pass_rate"] = float(pass_rate.mean())
    if singleton == "zero":
        adv = torch.where(single[inv], torch.zeros_like(adv), adv)
    state["metrics"] = metrics
    return adv


def _check_singleton(value):
    if value not in ("zero", "reference"):
        raise ConfigError(f"rl.advantage.singleton: expected 'zero' or 'reference', got {value!r}")


__all__ = ["ADVANTAGE_ESTIMATORS", "compute_advantages", "register_estimator", "estimator_options"]
