"""Tensor parallelism for Mixture-of-Experts feed-forwards: every expert's width split over the tp
ranks (Megatron's expert tensor parallelism), the router computed whole on every tp rank.

Inside one MoE layer on a tp rank:
  - the tokens arrive whole (under sequence parallelism the layer's input is all-gathered first),
  - the router runs on them unchanged, so every tp rank picks the same experts with the same weights,
  - each expert (and the shared experts) computes its slice of the hidden width: the gate/up rows and
    the down columns of this rank, so the layer's output is a partial sum over the tp ranks,
  - `mix_experts` (keel/model/moe.py: the weighted experts plus the shared ones, linear in the
    experts' outputs) is wrapped in Megatron's two conjugate operators: its inputs (the tokens and
    the routing weights) pass through `_CopyToTP` (identity forward, gradient summed over tp in the
    backward: each rank's gradient covers only its slice) and its output through a sum over tp
    (all-reduce forward, identity backward).
So every gradient that leaves the layer, and the router's own, is whole and equal on every tp rank,
as for the replicated parts of a TP block. Expert weights are DTensors sharded on their width
(Shard(1) for gate/up [E, hidden, dim], Shard(2) for down [E, dim, hidden]), so checkpoints hold
whole tensors and load into any layout; expert parallelism (keel/train/expert_parallel.py) then
shards dim 0 of the same tensors over ep. Model code is untouched: forwards are swapped on instances.

Under sequence parallelism the output sum is an all-reduce followed by taking this rank's sequence
chunk (a reduce-scatter would move half the bytes; kept simple while it is measured on CPU only).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

from keel.errors import ConfigError
from keel.model.moe import GroupedExperts, MoEFeedForward, SharedExperts

# parameter -> the dim its hidden width lies on (gate/up produce it, down consumes it)
EXPERT_WIDTH_DIMS = {"w1": 1, "w3": 1, "w2": 2}
SHARED_WIDTH_DIMS = {"w1": 0, "w3": 0, "w2": 1}  # nn.Linear weights [out, in]


def moe_paths(block: torch.nn.Module) -> list[str]:
    """The MoE feed-forwards of a block, by submodule path."""
    return [name for name, module in block.named_modules() if isinstance(module, MoEFeedForward)]


def apply_moe_tensor_parallel(moe: MoEFeedForward, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split the experts' width over tp and wrap the layer as the module docstring says."""
    tp = tp_mesh.size()
    for what, width in (("model.moe.expert_dim", moe.experts.w1.shape[1]),
                        ("model.moe.n_shared_experts x expert_dim", moe.shared.w1.weight.shape[0] if moe.shared else 0)):
        if width % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide {what} ({width}): experts split their width over tp")
    for name, dim in EXPERT_WIDTH_DIMS.items():
        _shard(moe.experts, name, tp_mesh, dim)
    moe.experts.forward = partial(_experts_forward_local, moe.experts)
    if moe.shared is not None:
        for name, dim in SHARED_WIDTH_DIMS.items():
            _shard(getattr(moe.shared, name), "weight", tp_mesh, dim)
        moe.shared.forward = partial(_shared_forward_local, moe.shared)
    moe.mix_experts = partial(_mix_experts_over_tp, moe.mix_experts, tp_mesh.get_group())
    if sequence_parallel:  # the router and the experts see the whole sequence; the block gets its chunk back
        parallelize_module(moe, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
        parallelize_module(moe, tp_mesh, PrepareModuleOutput(
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True))


def _shard(module: torch.nn.Module, name: str, mesh: DeviceMesh, dim: int) -> None:
    full = getattr(module, name).detach()
    local = full.chunk(mesh.size(), dim=dim)[mesh.get_local_rank()].clone()
    setattr(module, name, torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)))


def local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded weight (a plain tensor as it is)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _experts_forward_local(experts: GroupedExperts, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return experts.compute(x_sorted, counts, local(experts.w1), local(experts.w3), local(experts.w2))


def _shared_forward_local(shared: SharedExperts, x: torch.Tensor) -> torch.Tensor:
    w1, w3, w2 = (local(getattr(shared, n).weight) for n in ("w1", "w3", "w2"))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _mix_experts_over_tp(mix_experts, group, tokens, chosen, weights, split):
    partial_out = mix_experts(_CopyToTP.apply(tokens, group), chosen, _CopyToTP.apply(weights, group), split)
    return _SumOverTP.apply(partial_out, group)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over tp (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverTP(torch.autograd.Function):
    """All-reduce forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None
