"""`keel plan` of an RL recipe: one rank's share of an RL step traced in place of a training micro-batch.

An RL trainer that can be planned registers a step planner: `@register_step_plan("rec")` on a class
built from the recipe's config, with the task interface keel/train/plan.py traces (`fake_batch(rows,
cp)`, `loss_sum(model, batch)`, `sample_shape()`). Its forward and backward must hold what the
trainer's step holds; the optimizer and the sharded weights are traced as for `keel train`. The
step's prompts (users) are split over the data-parallel ranks, so a rank's micro-batch is its share.
"""
from __future__ import annotations

import copy
from typing import Callable

from keel.errors import ConfigError
from keel.train import parallel

STEP_PLANS: dict[str, Callable] = {}  # rl.trainer -> (cfg) -> a task-like step for keel plan


def register_step_plan(trainer: str):
    def decorator(cls):
        STEP_PLANS[trainer] = cls
        return cls
    return decorator


def rl_step_plan(cfg, world: int):
    """(the config to plan, the step to trace) of an RL recipe on `world` ranks: train.micro_batch
    becomes the prompts (users) of one forward, rl.micro_batch of one rank's share of
    rl.prompts_per_step, train.global_batch the step (with the micro-batches a rank accumulates),
    train.steps rl.steps."""
    if cfg.rl.trainer not in STEP_PLANS:
        raise ConfigError(f"rl.trainer: keel plan lays out {sorted(STEP_PLANS)} RL steps; {cfg.rl.trainer!r} is not "
                          f"planned yet")
    cfg = copy.deepcopy(cfg)
    dims = parallel.resolve_parallel_dims(cfg.parallel, world)
    per_rank = -(-cfg.rl.prompts_per_step // dims.dp)
    micro = min(per_rank, cfg.rl.micro_batch)
    accumulation = -(-per_rank // micro)
    cfg.train.micro_batch, cfg.train.global_batch, cfg.train.steps = micro, micro * accumulation * dims.dp, cfg.rl.steps
    return cfg, STEP_PLANS[cfg.rl.trainer](cfg)
