"""Muon (MomentUm Orthogonalized by Newton-Schulz), MuonRec variant, with AdamW for the rest.

One optimizer holds both kinds of groups (flag `use_muon`), so the trainer's single optimizer,
LR scheduler and DCP checkpoint path stay as they are. Muon groups (2-D hidden matrices):

    M <- beta M + (1 - beta) G                       momentum_buffer
    U  = G.lerp(M, beta)                             Nesterov
    O  = NS5(U)                                      newton_schulz5, bf16
    W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) O

AdamW groups (embeddings, LM head, norms, biases) do torch.optim.AdamW's update, op for op.

Sharded parameters (DTensor: FSDP2 Shard(0), TP Shard(0)/Shard(1), TP+FSDP2's _StridedShard,
HSDP Replicate+Shard): NS5 needs the whole matrix, so U is gathered with `full_tensor()`, but only
one rank of the parameter's mesh orthogonalises it: the DTensor parameters of a step take owners
round-robin over the mesh's ranks (row-major, in parameter order, so every rank computes the same
owners), each rank runs NS5 on the matrices it owns only, and the owner broadcasts O over the mesh
(one broadcast per mesh dimension, on the groups the mesh already has: no process group is created,
so a pipeline stage's sub-mesh works too). Each rank keeps the slice of O its placements give it
(cut locally). Parameters go in chunks of the mesh's size (gather all, orthogonalise the owned ones,
broadcast all), so the ranks' NS5 runs overlap and a rank holds about one full matrix per chunk.
Given the same gradients this is bit-identical to one process (the same NS5 on the same matrix).
FSDP2's reduce-scatter sums gradients in another order, though, and bf16 NS5 magnifies those last
bits, so a sharded run tracks one process's losses to ~1e-5 relative rather than exactly.
State is per-parameter tensors shaped like the parameter (DTensors for DTensor parameters), which
DCP saves and reshards.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from keel.train.param_groups import no_decay_ids

NS_COEFFS = (3.4445, -4.7750, 2.0315)
_HIDDEN = re.compile(r"(^|\.)layers\.\d+\.")


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of G = U S V^T by the quintic Newton-Schulz iteration.

    Runs in `dtype` (bf16, as Muon does) on X = G / ||G||_F, in the wide orientation (X X^T is the
    smaller Gram matrix). Singular values land roughly in [0.68, 1.2], not exactly 1: the
    coefficients trade exactness for speed; ones below ~1e-3 of ||G||_F are not lifted in 5 steps.
    bf16 rounding puts the result ~3-4% (relative Frobenius) from the exact iteration's.
    Returns G's dtype.
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz5: expected a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.T
    return X.to(G.dtype)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention q/k/v/o, MLP gate/up/down)."""
    return param.ndim == 2 and bool(_HIDDEN.search(name)) and "embed" not in name


def muon_param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """Muon on the hidden matrices; AdamW (decay / no decay as keel's AdamW) on everything else.

    The AdamW groups come first, so group 0's lr (the one the trainer logs) is still optim.lr.
    """
    exempt = no_decay_ids(model)
    muon, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_hidden_matrix(name, param):
            muon.append(param)
        elif id(param) in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    adam = dict(use_muon=False, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    groups = [
        dict(params=decay, weight_decay=cfg.weight_decay, **adam),
        dict(params=no_decay, weight_decay=0.0, **adam),
        dict(params=muon, use_muon=True, lr=cfg.lr if cfg.muon_lr is None else cfg.muon_lr,
             weight_decay=cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay,
             momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps),
    ]
    return [g for g in groups if g["params"]]


def _local_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of a full tensor, as `like`'s placements cut it (no communication)."""
    piece = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    if piece.shape != like.to_local().shape:
        raise RuntimeError(f"Muon: local shard {tuple(piece.shape)} does not match the parameter's "
                           f"{tuple(like.to_local().shape)} (placements {like.placements})")
    return piece


def _mesh_coordinate(mesh: DeviceMesh, flat: int) -> list[int]:
    """The coordinate of the flat-th rank of `mesh` (row-major)."""
    coord = []
    for size in reversed(mesh.shape):
        coord.append(flat % size)
        flat //= size
    return coord[::-1]


def _is_owner(mesh: DeviceMesh, owner: int) -> bool:
    return list(mesh.get_coordinate()) == _mesh_coordinate(mesh, owner)


def _broadcast_from_owner(tensor: torch.Tensor, mesh: DeviceMesh, owner: int) -> None:
    """Copy the owner's `tensor` to every rank of `mesh`: one broadcast per mesh dim, over the groups
    the mesh already has. After dim d, every rank whose coordinates past d equal the owner's has it."""
    src, me = _mesh_coordinate(mesh, owner), list(mesh.get_coordinate())
    for d in range(mesh.ndim):
        if mesh.size(d) == 1 or me[d + 1:] != src[d + 1:]:
            continue
        sender = tuple(me[:d] + [src[d]] + me[d + 1:])
        dist.broadcast(tensor, src=int(mesh.mesh[sender]), group=mesh.get_group(d))


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (2-D parameters only), AdamW for use_muon=False groups.

    Group keys: lr, weight_decay; Muon: momentum, nesterov, ns_steps; AdamW: betas, eps.
    Missing keys come from the constructor's defaults.
    """

    def __init__(self, params: Iterable, lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, use_muon: bool = True):
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: bad hyperparameters lr={lr} momentum={momentum} ns_steps={ns_steps}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(betas), eps=eps, use_muon=use_muon)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon: use_muon groups take 2-D parameters only, got shape "
                                         f"{tuple(p.shape)}; put it in a use_muon=False (AdamW) group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ns_turn = 0  # round-robin NS5 owner of the step's next DTensor parameter
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        beta = group["momentum"]
        chunk: list[tuple[DTensor, DTensor]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf, grad = state["momentum_buffer"], p.grad
            buf.lerp_(grad, 1 - beta)
            update = grad.lerp(buf, beta) if group["nesterov"] else buf
            if isinstance(p, DTensor):
                chunk.append((p, update))
                if len(chunk) >= p.device_mesh.size():
                    self._sharded_updates(chunk, group)
                    chunk = []
            else:
                self._apply(p, p, newton_schulz5(update, group["ns_steps"]), group)
        if chunk:
            self._sharded_updates(chunk, group)

    def _sharded_updates(self, chunk: list[tuple[DTensor, DTensor]], group: dict) -> None:
        """Gather every U of the chunk, NS5 the ones this rank owns, broadcast each O from its owner."""
        owners, owned = [], {}
        for i, (p, update) in enumerate(chunk):
            owner = self._ns_turn % p.device_mesh.size()
            self._ns_turn += 1
            full = update.full_tensor()  # a collective: every rank of the mesh, in the same order
            owners.append(owner)
            if _is_owner(p.device_mesh, owner):
                owned[i] = full  # the others' matrices are dropped at once
        for i, full in owned.items():
            owned[i] = newton_schulz5(full, group["ns_steps"])
        for i, ((p, update), owner) in enumerate(zip(chunk, owners)):
            ortho = owned.pop(i, None)
            if ortho is None:
                local = update.to_local()
                ortho = torch.empty(update.shape, dtype=local.dtype, device=local.device)
            _broadcast_from_owner(ortho, p.device_mesh, owner)
            # to_local() is a view: updating it updates the parameter's shard
            self._apply(p, p.to_local(), _local_shard(ortho, p), group)

    @staticmethod
    def _apply(p: torch.Tensor, local: torch.Tensor, ortho: torch.Tensor, group: dict) -> None:
        """W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) O, on this rank's part `local` of p."""
        lr, wd = group["lr"], group["weight_decay"]
        rows, cols = p.shape  # global shape
        scale = max(1.0, rows / cols) ** 0.5
        if wd != 0:
            local.mul_(1 - lr * wd)
        local.add_(ortho.to(local.dtype), alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update (decoupled weight decay, bias correction)."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            step = state["step"].item()
            if wd != 0:
                p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
