"""Optimizers and learning-rate schedules (linear warmup, then cosine or warmup-stable-decay)."""
from __future__ import annotations

import math

import torch

from keel.config import OptimConfig


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and embeddings (1-D tensors and the embedding table)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "tok_embeddings" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
    return optimizer, scheduler


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients, sharded (DTensor) or not; grads are scaled down to max_norm.

    Sums squares shard by shard in fp32 and all-reduces once, so the norm matches one process's to
    fp32 rounding (torch's clip_grad_norm_ on FSDP2 DTensors drifted by ~1e-5 relative here).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float32)
    replicated = torch.zeros((), dtype=torch.float32)
    mesh = None
    for g in grads:
        if isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements):
            mesh = g.device_mesh
            sharded = sharded.to(g.device) + g.to_local().float().pow(2).sum()
        else:
            local = g.to_local() if isinstance(g, DTensor) else g
            replicated = replicated.to(local.device) + local.float().pow(2).sum()
    if mesh is not None:
        for dim in range(mesh.ndim):  # every shard dim of the mesh holds a disjoint piece
            torch.distributed.all_reduce(sharded, group=mesh.get_group(dim))
    total = (sharded.to(replicated.device) + replicated).sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return total
