"""RL on many ranks: the policy and reference sharded with FSDP2, rollouts split over the
data-parallel ranks and gathered back, and the sums that make metrics whole again.

How a step is laid out over ranks (keel/rl/grpo.py):
  rollouts   every rank takes the same prompts from the stream and generates only its contiguous
             share of them, each prompt's samples seeded from the run seed and the prompt's place in
             the stream (SamplingParams.prompt_seeds) -> the rollouts are gathered, so every rank
             holds the whole step's rollouts, rewards and advantages, exactly as one process would.
  training   each mini-batch's sequences are split over the ranks; the loss is normalised by the
             whole mini-batch's counts and FSDP's gradient average is undone (x dp size), so the
             update equals one process's; every rank runs the same number of micro-batches (an
             empty share runs a masked-out one) because FSDP's collectives must line up.
  weights    the native engine on every rank keeps a whole copy of the policy in its own dtype for
             generation (as a colocated vLLM would); after each update the sharded weights are
             gathered one parameter at a time into it.

The layout comes from the recipe's `parallel` section like `keel train`'s. RL takes FSDP2 /
HSDP (`parallel.dp_shard`, `parallel.dp_replicate` with it) and tensor parallelism (`parallel.tp`,
without sequence parallelism: a rollout's length is whatever it is, not a multiple of tp). The tp
ranks of a data-parallel group hold the same sequences: they generate the same rollouts (gathered
once per data-parallel rank) and their metrics are summed over the data-parallel ranks only.
Pipeline, context and expert parallelism, and DDP alone, are refused with one line each.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from keel.checkpoint.dcp import load_model_weights
from keel.checkpoint.files import COMPLETE, resolve_checkpoint, tokenizer_dir_of
from keel.checkpoint.hf import import_adapter, is_hf_folder, load_hf_weights_sharded, locate
from keel.checkpoint.model_io import checkpoint_model_config
from keel.data.tokenizer import Tokenizer
from keel.errors import ConfigError
from keel.model.registry import build_model, get_model_spec
from keel.train import init, parallel
from keel.train.launch import DistInfo, init_distributed

# parallel.<key> -> why RL refuses it for now (a value other than 1 is refused).
_UNSUPPORTED = {
    "pp": "pipeline parallelism",
    "cp": "context parallelism",
    "ep": "expert parallelism",
}


@dataclass
class RLRanks:
    dist: DistInfo
    dims: parallel.ParallelDims
    mesh: object  # DeviceMesh, or None on one process
    dp_rank: int
    dp_size: int
    # A gloo group of every rank for gathering rollouts: its collectives may run in a background
    # thread (rl.one_step_off_policy) beside the default group's, which FSDP uses. None on one process.
    rollout_group: object = None

    @classmethod
    def start(cls, cfg) -> "RLRanks":
        info = init_distributed()
        for key, what in _UNSUPPORTED.items():
            if getattr(cfg.parallel, key) != 1:
                raise ConfigError(f"parallel.{key}: keel rl does not run {what} yet; shard the policy over "
                                  f"the ranks with parallel.dp_shard (FSDP2)")
        if cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel: keel rl runs tensor parallelism without sequence "
                              "parallelism (rollouts have any length, not a multiple of parallel.tp); set it to false")
        dims = parallel.resolve_parallel_dims(cfg.parallel, info.world_size)
        if dims.dp > 1 and not parallel.uses_fsdp(dims):
            raise ConfigError("parallel.dp_replicate: keel rl shards its policy with FSDP2; use parallel.dp_shard "
                              "(alone, or with dp_replicate for HSDP)")
        mesh = parallel.build_mesh(dims, info.device.type)
        dp_rank, dp_size = parallel.dp_rank_and_size(mesh, dims)
        rollout_group = dist.new_group(backend="gloo") if info.world_size > 1 else None
        return cls(info, dims, mesh, dp_rank, dp_size, rollout_group)

    @property
    def sharded(self) -> bool:
        return self.dist.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def share(self, count: int, rank: int | None = None) -> range:
        """This rank's contiguous share of `count` items (the first count % dp ranks take one more)."""
        rank = self.dp_rank if rank is None else rank
        base, extra = divmod(count, self.dp_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    def gather(self, mine: list, group=None) -> list:
        """Every data-parallel rank's list, concatenated in dp-rank order (the shares of `share`), on
        every rank. The tp ranks of a dp group hold equal lists: the first one's is taken."""
        if not self.sharded:
            return list(mine)
        everyone: list = [None] * self.dist.world_size
        dist.all_gather_object(everyone, (self.dp_rank, mine), group=group)
        parts = dict(reversed(everyone))  # dp rank -> its list (the lowest global rank's wins)
        return [item for dp_rank in range(self.dp_size) for item in parts[dp_rank]]

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over the data-parallel ranks (tp ranks hold copies of their group's values)."""
        if not self.sharded or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        for dim in ("dp_replicate", "dp_shard"):
            if self.mesh[dim].size() > 1:
                dist.all_reduce(t, group=self.mesh[dim].get_group())
        return t.tolist()

    def all_max(self, values: list[float], group=None) -> list[float]:
        if not self.sharded or not values:
            return list(values)
        device = "cpu" if group is not None else self.dist.device  # a given group is gloo (rollout_group)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.tolist()

    def sum_dict(self, values: dict) -> dict:
        """{key: sum over ranks} of every key any rank has (a rank without a key adds 0)."""
        if not self.sharded:
            return dict(values)
        keys = sorted({k for part in self.gather([sorted(values)]) for k in part})
        return dict(zip(keys, self.all_sum([values.get(k, 0.0) for k in keys])))

    def max_dict(self, values: dict) -> dict:
        """{key: max over ranks} of every key any rank has."""
        if not self.sharded:
            return dict(values)
        keys = sorted({k for part in self.gather([sorted(values)]) for k in part})
        return dict(zip(keys, self.all_max([values.get(k, float("-inf")) for k in keys])))

    def micro_batch_count(self, count: int, size: int) -> int:
        """Micro-batches of `size` every rank runs over its share of `count` items: as many as the rank
        with the largest share needs (FSDP's gathers and reduces must line up across ranks; a rank
        short of items runs a zero-weighted repeat)."""
        return -(-len(self.share(count, 0)) // size)

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


# ------------------------------------------------------------------ the sharded policy

def is_keel_checkpoint(path: Path) -> bool:
    """A keel run directory or committed checkpoint (as opposed to an HF folder or a .gguf)."""
    return (path / COMPLETE).is_file() or (path / "checkpoints").is_dir()


def policy_source(spec: str, with_tokenizer: bool = True):
    """(model config, weights path, keel Tokenizer or None) of an `rl.policy` for a sharded load: an HF
    folder (or `smollm2`) read slice by slice, or a keel run/checkpoint read by DCP (a recommender's
    has no tokenizer, and `keel plan` needs only the shape: `with_tokenizer=False`)."""
    path = Path(spec).expanduser()
    if spec != "smollm2" and path.exists() and is_keel_checkpoint(path):
        ckpt = resolve_checkpoint(path, "rl.policy")
        model_cfg = checkpoint_model_config(ckpt)
        model_cfg.init_from = None
        if not with_tokenizer:
            return model_cfg, ckpt, None
        folder = tokenizer_dir_of(ckpt)
        if folder is None:
            raise ConfigError(f"rl.policy: {path} has no tokenizer/ folder saved with it")
        return model_cfg, ckpt, Tokenizer.load(str(folder))
    from transformers import AutoConfig  # heavy: only for an HF policy

    folder, gguf = locate(spec)
    if gguf:
        raise ConfigError(f"rl.policy: {folder / gguf}: a .gguf policy loads on one process only; "
                          f"`keel import hf` it once and point rl.policy at the imported folder")
    hf_config = AutoConfig.from_pretrained(folder)
    model_cfg = import_adapter(hf_config, str(folder)).from_config(hf_config, str(folder))
    return model_cfg, folder, Tokenizer.load(str(folder)) if with_tokenizer else None


def build_sharded_policy(spec: str, cfg, ranks: RLRanks, trainable: bool = True,
                         forward_methods: tuple = ("hidden_states",), with_tokenizer: bool = True):
    """(model, tokenizer): the policy built on meta, sharded with keel/train's parallelize path (FSDP2,
    activation checkpointing as the recipe says), then each rank reads only its own shards.
    Parameters stay fp32 and all-gather in fp32 (the step runs under autocast, as on one process, so
    the numerics do not depend on the layout)."""
    model_cfg, weights, tokenizer = policy_source(spec, with_tokenizer)
    model = build_model(model_cfg, "meta")
    model = parallel.parallelize(model, ranks.mesh, ranks.dims, cfg.parallel, get_model_spec(model_cfg.name).tp_plan)
    # RL scores tokens through methods other than forward() (an LM: hidden_states() + the head
    # weight, keel/rl/scoring.py; a recommender: code_logprobs()): FSDP must gather the root's weights
    # for those calls too. The root keeps them gathered after it (reshard_after_forward=False), which
    # is what lets the head weight be read right after.
    for method in forward_methods:
        register_fsdp_forward_method(model, method)
    init.materialize([model], ranks.dist.device)
    model.init_buffers()
    if is_hf_folder(weights):
        load_hf_weights_sharded(weights, model, "rl.policy")
    else:
        load_model_weights(weights, model, "rl.policy")
    if not trainable:
        return model.eval().requires_grad_(False), tokenizer
    return model.train(), tokenizer


def whole_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every parameter, gathered one at a time from a sharded model (every
    rank must iterate it to the end, in step: each gather is a collective); names as one process's."""
    for name, param in model.named_parameters():
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor
