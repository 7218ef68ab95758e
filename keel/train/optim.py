"""Optimizers and learning-rate schedules (linear warmup, then cosine or warmup-stable-decay)."""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from keel.train.config import OptimConfig
from keel.train.muon import Muon, muon_param_groups
from keel.train.param_groups import param_groups


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of optim.lr for the update made at `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of steps.
    decay_steps = max(1, int(round(cfg.decay_fraction * total)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def mixes_dtensors(model: torch.nn.Module) -> bool:
    """True under TP without FSDP: sharded DTensor weights beside plain replicated ones, a mix
    that foreach kernels refuse."""

    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    return len(kinds) > 1


def _adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, foreach=not mixes_dtensors(model))


def _muon(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return Muon(muon_param_groups(model, cfg))


# optim.name -> (model, cfg) -> one torch.optim.Optimizer (the scheduler scales all its groups).
OPTIMIZERS = {"adamw": _adamw, "muon": _muon}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    optimizer = OPTIMIZERS[cfg.name](model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
    return optimizer, scheduler


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, sum_group=None, skip: frozenset = frozenset()) -> torch.Tensor:
    """Global L2 norm of all gradients, sharded (DTensor) or not; grads are scaled down to max_norm.

    Squares are summed per shard in fp32 and all-reduced only over the mesh dims a gradient is
    sharded on (a TP-replicated, FSDP-sharded norm weight is reduced over dp, not over tp), so the
    norm equals one process's to fp32 rounding. (torch's clip_grad_norm_ on FSDP2 DTensors
    drifted by ~1e-5 relative here.) Under pipeline parallelism each pp rank holds other
    parameters: `sum_group` adds their squares up, and `skip` names (by id) parameters another
    rank already counts (a tied embedding's second copy), which are clipped but not counted.
    """

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    partial_sums: dict = {}  # (mesh, sharded mesh dims) -> sum of squares of the local shards
    for g in (p.grad for p in params if id(p) not in skip):
        if isinstance(g, DTensor):
            # Any placement that is neither replicated nor partial splits the tensor (FSDP over TP
            # uses _StridedShard, whose is_shard() is False).
            dims = tuple(i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial()))
            key, local = (g.device_mesh, dims), g.to_local()
        else:
            key, local = (None, ()), g
        partial_sums[key] = partial_sums.get(key, 0.0) + local.float().pow(2).sum()
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for (mesh, dims), value in partial_sums.items():  # same order on every rank: parameter order
        for dim in dims:
            torch.distributed.all_reduce(value, group=mesh.get_group(dim))
        total = total + value.to(total.device)
    if sum_group is not None:
        torch.distributed.all_reduce(total, group=sum_group)
    total = total.sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return total


def adapter_optimizer(model: torch.nn.Module, optim_cfg: OptimConfig, total_steps: int):
    """(optimizer, LR scheduler) over the trainable parameters alone (LoRA adapters), as
    build_optimizer builds them. Adapters are all matrices, so the no-decay group is empty and
    left out: DCP's flattened optimizer state cannot restore an empty parameter group."""
    optimizer, _ = build_optimizer(model, optim_cfg, total_steps)
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, optim_cfg))
    return optimizer, scheduler
