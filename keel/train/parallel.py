"""The device mesh and the parallelisms applied to a single-device model, in a fixed order.

Mesh dims (outer to inner): pp, dp_replicate, dp_shard, cp, tp; their product is the world size.
This issue applies data parallelism: DDP (dp_replicate alone), FSDP2 (dp_shard) and HSDP (both).
TP/SP, CP and PP slot in before FSDP here without touching model files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from keel.config import ParallelConfig
from keel.errors import ConfigError

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


def apply_data_parallel(model: torch.nn.Module, mesh: DeviceMesh | None, dims: ParallelDims,
                        param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 per block then root (HSDP when dp_replicate > 1 too), or DDP when only replicating.

    The model must already hold its initial weights (identical on every rank).
    """
    if mesh is None:
        return model
    if dims.dp_shard > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh, mp_policy=mp)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    elif dims.dp_replicate > 1:
        from torch.distributed._composable.replicate import replicate

        replicate(model, device_mesh=mesh["dp_replicate"])
    return model


def uses_fsdp(dims: ParallelDims) -> bool:
    return dims.dp_shard > 1
