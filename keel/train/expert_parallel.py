"""Expert parallelism: each MoE layer's experts sharded over `parallel.ep` ranks, tokens moved to
their expert's rank and back with all-to-all (torch.distributed.all_to_all_single; gloo and NCCL).

Layout (a choice): ep folds into the data-parallel ranks. The ep ranks are consecutive
data-parallel ranks, so with W data ranks there are W/ep groups of ep ranks; each group holds every expert once (E/ep per rank), and the W/ep groups are replicas of
each other. Expert weights are DTensors Shard(0) over a 1-D `ep` mesh, so DCP checkpoints store the
whole [E, ...] tensors and load into any layout (one process included). FSDP2 shards the dense
parameters over all W ranks and ignores the experts; their gradients are reduced here instead:
  - a rank's expert gradient already sums the tokens of its whole ep group (they were sent to it),
  - so it is summed over the replica groups (all-reduce over `ep_replicate`), and divided by W,
    the same average over data ranks FSDP applies to the dense gradients (the trainer scales the
    loss by the data-parallel size to undo that average).
With tp, each tp rank of an ep group holds its width slice of the same experts and gets the same
tokens (the router's choice is identical over tp), so the all-to-all runs between ranks of one tp
coordinate. Under pp each stage has its own ep groups and replicas. Data parallelism, tp and pp
compose with ep for now (cp, DDP alone and DeepSpeed are refused by keel/train/config.py). Model code is untouched: GroupedExperts.forward is swapped on the instance.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from keel.errors import ConfigError
from keel.model.moe import GroupedExperts

EXPERT_WEIGHTS = ("w1", "w3", "w2")


def build_ep_mesh(ep: int, tp: int, device_type: str, pp: int = 1) -> DeviceMesh:
    """(ep_pp, ep_replicate, ep, ep_tp) over the world ranks, pp outermost and tp innermost as in the
    main mesh: an ep group is ep data-parallel ranks of one pipeline stage that share a tp coordinate."""
    world = dist.get_world_size()
    if world % (pp * ep * tp):
        raise ConfigError(f"parallel.ep: {ep} does not divide the {world // (pp * tp)} data-parallel ranks")
    return init_device_mesh(device_type, (pp, world // (pp * ep * tp), ep, tp),
                            mesh_dim_names=("ep_pp", "ep_replicate", "ep", "ep_tp"))


def expert_modules(model: torch.nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def apply_expert_parallel(model: torch.nn.Module, mesh: DeviceMesh, tp: int) -> set:
    """Shard every GroupedExperts over the ep ranks of `mesh` (build_ep_mesh); returns the expert
    parameters (for FSDP to ignore). Under tp the experts are already split on their width
    (keel/train/moe_tensor_parallel.py): the tp-local slice is split again on dim 0, into a DTensor
    over the (ep, ep_tp) mesh."""
    ep = mesh["ep"].size()
    ep_mesh, rank = mesh["ep"], mesh["ep"].get_local_rank()
    replicate_group = mesh["ep_replicate"].get_group() if mesh["ep_replicate"].size() > 1 else None
    sharded = set()
    for experts in expert_modules(model):
        n_experts = experts.w1.shape[0]
        if n_experts % ep:
            raise ConfigError(f"parallel.ep: {ep} does not divide model.moe.n_experts {n_experts}")
        per_rank = n_experts // ep
        for name in EXPERT_WEIGHTS:
            weight = getattr(experts, name)
            placements, target = [Shard(0)], ep_mesh
            if isinstance(weight, DTensor):  # width-split over tp already
                placements, target = [Shard(0), *weight.placements], mesh["ep", "ep_tp"]
                weight = weight.to_local()
            local = weight.detach()[rank * per_rank:(rank + 1) * per_rank].clone()
            param = torch.nn.Parameter(DTensor.from_local(local, target, placements, run_check=False))
            setattr(experts, name, param)
            sharded.add(param)
        experts.forward = partial(expert_parallel_forward, experts, ep_mesh.get_group(), replicate_group,
                                  mesh.size() // (tp * mesh["ep_pp"].size()))
    return sharded


class _ReduceExpertGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the replica groups and divides by the
    data-parallel size (module docstring). Each micro-batch's share is reduced on its own: linear."""

    @staticmethod
    def forward(ctx, weight, replicate_group, data_ranks):
        ctx.replicate_group, ctx.data_ranks = replicate_group, data_ranks
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad / ctx.data_ranks
        if ctx.replicate_group is not None:
            dist.all_reduce(grad, group=ctx.replicate_group)
        return grad, None, None


def expert_parallel_forward(experts: GroupedExperts, group, replicate_group, data_ranks: int,
                            x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """GroupedExperts.forward under ep: tokens sorted by global expert in, the same order out."""
    ep = dist.get_world_size(group)
    per_rank = len(counts) // ep
    if experts.planning:  # keel plan's fake tensors: routing taken as balanced, so a rank gets what it sends
        even, extra = divmod(x_sorted.shape[0], per_rank)
        return experts.compute(x_sorted, [even + (e < extra) for e in range(per_rank)],
                               *(getattr(experts, n).to_local() for n in EXPERT_WEIGHTS))
    # 1. Split sizes first: how many tokens each rank sends to each of my experts.
    send_counts = torch.tensor(counts, dtype=torch.int64, device=x_sorted.device)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv_counts = recv_counts.view(ep, per_rank)  # [source rank, my local expert]
    send_splits = send_counts.view(ep, per_rank).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    # 2. Dispatch (autograd-aware: the backward sends gradients the opposite way).
    received = funcol.all_to_all_single_autograd(x_sorted.contiguous(), recv_splits, send_splits, group)
    # Arrived grouped by source rank, then expert; the grouped GEMM wants expert, then source.
    chunk_sizes = recv_counts.flatten().tolist()
    by_expert = [src * per_rank + e for e in range(per_rank) for src in range(ep)]
    chunks = received.split(chunk_sizes)
    grouped = torch.cat([chunks[i] for i in by_expert]) if chunks else received
    weights = [_ReduceExpertGrad.apply(getattr(experts, n).to_local().to(x_sorted.dtype), replicate_group, data_ranks)
               for n in EXPERT_WEIGHTS]
    out = experts.ffn(grouped, recv_counts.sum(0).tolist(), *weights)
    # 3. Back to source-rank order, then combine: each token returns to the rank that sent it.
    out_chunks = out.split([chunk_sizes[i] for i in by_expert])
    by_source = [None] * len(by_expert)
    for position, i in enumerate(by_expert):
        by_source[i] = out_chunks[position]
    out = torch.cat(by_source) if by_source else out
    return funcol.all_to_all_single_autograd(out.contiguous(), send_splits, recv_splits, group)
