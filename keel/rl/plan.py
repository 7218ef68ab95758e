"""`keel plan` of an RL recipe: one rank's share of an RL step traced in place of a training micro-batch.

An RL trainer that can be planned registers a step planner: `@register_step_plan("rec")` on a class
built from the recipe's config, with the task interface keel/train/plan.py traces (`fake_batch(rows,
cp)`, `loss_sum(model, batch)`, `sample_shape()`). Its forward and backward must hold what the
trainer's step holds; the optimizer and the sharded weights are traced as for `keel train`. The
step's rows (users; or sequences, prompts x samples: the planner's `rows_per_step`) are split over
the data-parallel ranks, so a rank's micro-batch is its share. A planner may set the config's model
from rl.policy (its constructor gets the config to plan).
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
    becomes the rows (users, or sequences) of one forward, rl.micro_batch of one rank's share of the
    step's rows, train.global_batch the step (with the micro-batches a rank accumulates), train.steps
    rl.steps."""
    if cfg.rl.trainer not in STEP_PLANS:
        raise ConfigError(f"rl.trainer: keel plan lays out {sorted(STEP_PLANS)} RL steps; {cfg.rl.trainer!r} is not "
                          f"planned yet")
    cfg = copy.deepcopy(cfg)
    planner = STEP_PLANS[cfg.rl.trainer]
    dims = parallel.resolve_parallel_dims(cfg.parallel, world)
    rows = planner.rows_per_step(cfg.rl) if hasattr(planner, "rows_per_step") else cfg.rl.prompts_per_step
    per_rank = -(-rows // dims.dp)
    micro = min(per_rank, cfg.rl.micro_batch)
    accumulation = -(-per_rank // micro)
    cfg.train.micro_batch, cfg.train.global_batch, cfg.train.steps = micro, micro * accumulation * dims.dp, cfg.rl.steps
    return cfg, planner(cfg)
