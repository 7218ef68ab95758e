"""The device mesh and the parallelisms applied to a single-device model, in a fixed order:
TP/SP (MoE experts split on their width, keel/train/moe_tensor_parallel.py) -> CP -> EP (MoE
experts split over ranks, keel/train/expert_parallel.py) -> activation checkpointing ->
per-block torch.compile -> FSDP2 / DDP, on a model that may still be on the meta device.

Mesh dims (outer to inner): pp, dp_replicate, dp_shard, cp, tp; their product is the world size.
ep folds into the data-parallel ranks and has its own (ep_pp, ep_replicate, ep, ep_tp) mesh over the same ranks.
Data parallelism: DDP (dp_replicate alone), FSDP2 (dp_shard) and HSDP (both). Tensor parallelism
follows the model family's TensorParallelPlan. Model files never import any of this.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.distributed._composable.replicate import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from keel.errors import ConfigError
from keel.train.config import ParallelConfig
from keel.train.context_parallel import apply_context_parallel
from keel.train.expert_parallel import apply_expert_parallel, build_ep_mesh
from keel.train.moe_tensor_parallel import apply_moe_tensor_parallel, moe_paths

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp


def resolve_parallel_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    fixed = cfg.pp * cfg.dp_replicate * cfg.cp * cfg.tp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(f"parallel: pp*dp_replicate*cp*tp = {fixed} does not divide the world size {world_size}")
        dp_shard = world_size // fixed
    dims = ParallelDims(cfg.pp, cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel: pp*dp_replicate*dp_shard*cp*tp = {cfg.pp}*{cfg.dp_replicate}*{dp_shard}*{cfg.cp}*{cfg.tp}"
            f" = {dims.world_size}, but the world size is {world_size}")
    return dims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    if dims.world_size == 1:
        return None
    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def dp_rank_and_size(mesh: DeviceMesh | None, dims: ParallelDims) -> tuple[int, int]:
    """This rank's index among the data-parallel ranks (replicate x shard), and their count."""
    if mesh is None:
        return 0, 1
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    coord = dp_mesh.get_coordinate()
    return coord[0] * dims.dp_shard + coord[1], dims.dp


def data_all_reduce_sum(tensor: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum over the ranks that hold different tokens (dp and cp); tp ranks hold copies."""
    if mesh is not None:
        for dim in ("dp_replicate", "dp_shard", "cp"):
            if mesh[dim].size() > 1:
                torch.distributed.all_reduce(tensor, group=mesh[dim].get_group())
    return tensor


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh: DeviceMesh, plan, sequence_parallel: bool) -> None:
    """Megatron TP on every block, with the residual stream on sequence shards under SP.

    Embeddings, the final norm and the LM head stay replicated over tp (every tp rank computes
    them alike), so tied embeddings and the chunked loss need nothing special. Under SP the first
    block's input is split along the sequence and the last block's output gathered again.
    """

    stream = Shard(1) if sequence_parallel else Replicate()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # Entries a block lacks are skipped: optional copies (KSA's private summary modules) and the
        # dense FFN's linears where an MoE feed-forward took its place (it gets its own split below).
        moes = moe_paths(block)
        styles = {name: ColwiseParallel() for name in plan.colwise if _has_submodule(block, name)}
        styles.update({name: RowwiseParallel(output_layouts=stream)
                       for name in plan.rowwise if _has_submodule(block, name)})
        # A per-head norm's weight is shared by all heads: treat its input as split over heads
        # (dim 2) so its gradient is summed over tp ranks.
        styles.update({name: SequenceParallel(sequence_dim=2, use_local_output=True)
                       for name in plan.head_norms if _has_submodule(block, name)})
        if sequence_parallel:
            styles.update({name: SequenceParallel() for name in plan.sequence_norms})
            for name, n_args in plan.gathered_inputs:
                if name in moes:  # an MoE layer gathers its own input (keel/train/moe_tensor_parallel.py)
                    continue
                styles[name] = PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_args - 1),
                                                  desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1))
        parallelize_module(block, tp_mesh, styles)
        for path in moes:
            apply_moe_tensor_parallel(block.get_submodule(path), tp_mesh, sequence_parallel)
        if sequence_parallel and i == 0:
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(),) + (None,) * 4, desired_input_layouts=(Shard(1),) + (None,) * 4,
                use_local_output=True))
        if sequence_parallel and i == len(blocks) - 1:
            parallelize_module(block, tp_mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


# Under selective checkpointing these ops' outputs are saved; everything else is recomputed. Of the
# blocks' matmuls (mm/addmm: the linears) only every second one is saved (TorchTitan's policy: about
# half the recompute for half the memory). Always saved: the collectives' outputs (recomputing them
# would mean communicating again) and the fused attention kernels' (output and log-sum-exp: small,
# and the most expensive op to redo). Never saved: attention scores — the dense-mask math path's
# [B, H, L, L] products are bmm, which is in neither list, so they are recomputed.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ALWAYS_SAVED = {torch.ops._c10d_functional.reduce_scatter_tensor.default,
                 torch.ops._c10d_functional.all_gather_into_tensor.default,
                 torch.ops._c10d_functional.all_reduce.default,
                 torch.ops._c10d_functional.all_to_all_single.default,
                 torch.ops.aten._scaled_dot_product_flash_attention.default,
                 torch.ops.aten._scaled_dot_product_efficient_attention.default,
                 torch.ops.aten._scaled_dot_product_cudnn_attention.default,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                 torch.ops.higher_order.flex_attention}


def _selective_policy():
    """A fresh policy per checkpointed region (the matmul count restarts for every block). torch asks
    it during the forward only and replays its decisions in the recompute."""
    seen = {"mm": 0}

    def policy(ctx, op, *args, **kwargs):
        if op in _ALWAYS_SAVED:
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMULS:
            seen["mm"] += 1
            return CheckpointPolicy.MUST_SAVE if seen["mm"] % 2 == 1 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """full: recompute each block in the backward. selective: save every second linear's output, the
    collectives' and the fused attention kernels', recompute the rest (elementwise ops, norms)."""

    if mode == "none":
        return
    context_fn = None
    if mode == "selective":
        context_fn = lambda: create_selective_checkpoint_contexts(_selective_policy())  # noqa: E731 (one per region)
    for name, block in list(model.layers.items()):
        kwargs = {"context_fn": context_fn} if context_fn else {}
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


def apply_compile(model: torch.nn.Module) -> None:
    """Compile block by block: blocks are identical, so one compiled graph serves them all. fullgraph:
    a graph break would silently cost speed; keel's blocks have none, and a new one is an error."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def parallelize(model: torch.nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, cfg: ParallelConfig,
                tp_plan, param_dtype: torch.dtype | None = None, ep_mesh: DeviceMesh | None = None) -> torch.nn.Module:
    """Apply every parallelism and wrapper in keel's fixed order. The model holds its weights.
    `ep_mesh`: expert parallelism's mesh when the caller built it already (keel plan builds its
    meshes before tracing on fake tensors, where a mesh cannot be made)."""
    if dims.tp > 1 and dims.dp_replicate > 1 and dims.dp_shard == 1:
        raise ConfigError("parallel.dp_replicate: DDP does not take tensor-parallel weights; with "
                          "parallel.tp use parallel.dp_shard (FSDP2), or both for HSDP")
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], tp_plan, cfg.sequence_parallel)
    if dims.cp > 1:
        apply_context_parallel(model, mesh["cp"], model.config.attention)
    experts = set()
    if cfg.ep > 1:
        experts = apply_expert_parallel(model, ep_mesh or build_ep_mesh(cfg.ep, dims.tp, mesh.device_type, dims.pp),
                                        dims.tp)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    return apply_data_parallel(model, mesh, dims, param_dtype, ignored=experts, cfg=cfg)


def apply_data_parallel(model: torch.nn.Module, mesh: DeviceMesh | None, dims: ParallelDims,
                        param_dtype: torch.dtype | None = None, ignored: set | None = None,
                        cfg: ParallelConfig | None = None) -> torch.nn.Module:
    """FSDP2 per block, the embedding (untied) as its own unit, then the root (HSDP when
    dp_replicate > 1 too), or DDP when only replicating.

    The model may still be on meta (keel/train/init.py materialises it afterwards). `ignored`:
    parameters another parallelism owns and reduces (expert-parallel experts). The final norm and
    the LM head stay in the root unit: the chunked loss reads the head's weight directly, not
    through a module call that would trigger its all-gather.
    """
    cfg = cfg or ParallelConfig()
    if mesh is None:
        return model
    if uses_fsdp(dims):

        # cp ranks hold different tokens of the same sequences: their gradients are summed and
        # their weights sharded together with dp_shard (TorchTitan's dp_shard_cp).
        shard_dim = "dp_shard"
        if dims.cp > 1:
            mesh["dp_shard", "cp"]._flatten(mesh_dim_name="dp_shard_cp")
            shard_dim = "dp_shard_cp"
        dp_mesh = mesh["dp_replicate", shard_dim] if dims.dp_replicate > 1 else mesh[shard_dim]
        # cast_forward_inputs=False: FSDP would otherwise cast every floating input of a unit to bf16,
        # RoPE's cos/sin among them, and the numerics would depend on the layout. Block inputs are
        # already bf16 (the embedding's output); RoPE stays fp32 as in one process.
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        reshard = dims.pp == 1 if cfg.reshard_after_forward is None else cfg.reshard_after_forward
        unit = partial(fully_shard, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored or None)
        for block in model.layers.values():
            unit(block, reshard_after_forward=reshard)
        if getattr(model, "tok_embeddings", None) is not None and getattr(model, "output", None) is not None:
            unit(model.tok_embeddings, reshard_after_forward=reshard)  # tied: the head reads it in the root
        unit(model, reshard_after_forward=False)  # the root's weights are needed again at once in backward
    elif dims.dp_replicate > 1:

        replicate(model, device_mesh=mesh["dp_replicate"], bucket_cap_mb=cfg.ddp_bucket_mb)
    return model


def gradient_sync_on(micro_batch: int, n_micro_batches: int, dims: ParallelDims, cfg: ParallelConfig) -> bool:
    """Whether this micro-batch's backward reduces gradients over the data-parallel ranks. DDP holds
    full gradients anyway: reduce once, after the last. FSDP: after every micro-batch unless asked
    (`parallel.fsdp_grad_sync`), so only sharded gradients are ever kept."""
    last = micro_batch == n_micro_batches - 1
    if uses_fsdp(dims):
        return last or cfg.fsdp_grad_sync == "every_micro_batch"
    return last


def uses_fsdp(dims: ParallelDims) -> bool:
    return dims.dp_shard * dims.cp > 1
