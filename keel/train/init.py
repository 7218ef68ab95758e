"""Initial weights of a parallelized model, without any rank ever holding the whole model.

The trainer builds the model on the meta device, applies every parallelism to it there (TP/SP, CP,
EP, the pipeline cut, FSDP/HSDP), and only then gives each rank memory for its own shards
(`to_empty`). The weights are then either loaded (`model.init_from`: DCP reads each rank's shards
only) or initialised by the model's own `init_weights()`, run on the sharded model under
`sharded_random_init`. `model.init_from` may also name a Hugging Face folder: its safetensors
are read slice by slice too (keel/checkpoint/hf.py).

Layout-independent initial weights. A random fill (normal_, uniform_) of a sharded DTensor is
drawn for the whole tensor from the training device's default generator, exactly as one process
would draw it, and each rank keeps its slice; a fill of a tensor this rank does not hold (a layer of
another pipeline stage, still on meta) is drawn and thrown away, so the generator advances as in one
process. Every rank thus ends with its part of the very weights one process would have made, in
any layout, from `train.seed` alone. The price is one full-size temporary per parameter (the largest
is the embedding table: 2 GiB in fp32 for an 8B Llama), never the whole model. DTensor's own
random ops would instead draw per shard (on CUDA) or repeat one draw in every shard (on CPU).
A seed checkpoint (`keel init`) fixes the weights once for every layout and device type.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from keel.checkpoint.dcp import load_model_weights
from keel.checkpoint.files import resolve_checkpoint
from keel.checkpoint.hf import is_hf_folder, load_hf_weights_sharded
from keel.checkpoint.model_io import write_sharded_model_checkpoint
from keel.model.registry import build_model
from keel.train import parallel
from keel.train.launch import init_distributed

_RANDOM_FILLS = {torch.ops.aten.normal_.default, torch.ops.aten.uniform_.default}


class WholeTensorWrites(TorchDispatchMode):
    """In-place writes to tensors this rank holds only part of, done on a whole-size temporary on the
    training device (so random fills draw exactly what one process draws), of which the rank keeps
    its part. Subclasses say which writes to a target this concerns and how its part is kept."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)

    def concerns(self, func, target: torch.Tensor) -> bool:
        raise NotImplementedError

    def keep_part(self, target: torch.Tensor, whole: torch.Tensor) -> None:
        raise NotImplementedError

    def whole_like(self, target: torch.Tensor) -> torch.Tensor:
        return torch.empty(target.shape, dtype=target.dtype, device=self.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if not (isinstance(target, torch.Tensor) and self.concerns(func, target)):
            return func(*args, **kwargs)
        whole = self.whole_like(target)
        func(whole, *args[1:], **kwargs)
        self.keep_part(target, whole)
        return target


class _WholeTensorRandomFills(WholeTensorWrites):
    """See the module docstring: random fills of sharded DTensors, or of tensors still on meta."""

    def concerns(self, func, target) -> bool:
        return func in _RANDOM_FILLS and (isinstance(target, DTensor) or target.is_meta)

    def keep_part(self, target, whole) -> None:
        if isinstance(target, DTensor):  # a meta target (another stage's layer): the draw only advances the generator
            # src_data_rank=None: every rank cuts its own slice of its own (identical) draw, no communication.
            mine = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)
            target._local_tensor.copy_(mine._local_tensor)


@contextlib.contextmanager
def sharded_random_init(device: torch.device):
    with torch.no_grad(), _WholeTensorRandomFills(device):
        yield


def initialize_weights(whole: torch.nn.Module, parts: list[torch.nn.Module], device: torch.device,
                       seed: int, init_from: str | None, load_into: torch.nn.Module) -> None:
    """Fill the materialised `parts` (this rank's pieces of `whole`, already on `device`).

    whole: the model as built (under pp, with the layers of other ranks' stages still on meta).
    load_into: the module whose state dict names this rank's weights (the model, or the pipeline's
    StageParts) for `init_from`.
    """
    if init_from:
        for part in parts:
            part.init_buffers()
        if is_hf_folder(init_from):  # safetensors read slice by slice, no `keel import hf` needed
            load_hf_weights_sharded(init_from, load_into, "model.init_from")
        else:
            load_model_weights(resolve_checkpoint(init_from, "model.init_from"), load_into, "model.init_from")
        return
    torch.manual_seed(seed)  # the same draws on every rank, in the same order as one process
    with sharded_random_init(device):
        whole.init_weights()
    for part in parts:  # a pipeline stage is a copy of the model with buffers of its own
        part.init_buffers()


def materialize(parts: list[torch.nn.Module], device: torch.device) -> None:
    for part in parts:
        part.to_empty(device=device)


def write_seed_checkpoint(cfg, out_dir) -> Path:
    """`keel init`: the recipe's initial weights (train.seed) as a model-only checkpoint, for
    `model.init_from` in any layout. Under torchrun the model is sharded over all ranks (FSDP) and
    each rank draws and writes only its shards, so a seed checkpoint of any size needs no big host."""
    info = init_distributed()
    dims = parallel.ParallelDims(pp=1, dp_replicate=1, dp_shard=info.world_size, cp=1, tp=1)
    model = build_model(cfg.model, "meta")
    model = parallel.apply_data_parallel(model, parallel.build_mesh(dims, info.device.type), dims)
    materialize([model], info.device)
    initialize_weights(model, [model], info.device, cfg.train.seed, init_from=None, load_into=model)
    return write_sharded_model_checkpoint(out_dir, cfg.model, model, {"seed": cfg.train.seed, "seed_checkpoint": True})
