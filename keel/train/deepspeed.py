"""DeepSpeed ZeRO as a second training engine: `parallel.engine: deepspeed`.

Same model, data, torch AdamW (keel's parameter groups), schedule and loss normalisation as keel's
engine; ZeRO stage 1/2/3 shards optimizer states / gradients / parameters, optionally offloaded to
the CPU. The DeepSpeed config comes from the recipe, `parallel.ds_config` (JSON file or mapping)
merged over it. Each micro-batch runs engine.backward/step (gradient_accumulation_steps = keel's
micro-batches per step) on the loss scaled by dp_size / global tokens, as DeepSpeed averages over
ranks: the update equals one process's. Clipping is DeepSpeed's (keel's formula); a non-finite
gradient norm makes ZeRO skip the update, which keel's train.nonfinite policy then handles.

ZeRO-3 builds the model under `deepspeed.zero.Init`: each module's parameters are partitioned as
soon as it is constructed, so no rank ever holds the whole model. keel's `init_weights()` then runs
on the partitioned model under `_PartitionedInit`: each in-place fill of a parameter (normal_,
ones_, zeros_) is done on a whole-size temporary, drawn from train.seed as one process draws it,
and each rank keeps its partition (one parameter at a time, no communication), so the initial
weights equal the other engines'. The optimizer's groups are formed again on the parameters'
whole shapes (weight decay skips 1-D ones; a partition is 1-D). With `model.init_from` the model
is still built whole and loaded before ZeRO partitions it at `deepspeed.initialize`.

Checkpoints keep keel's layout and atomic protocol (step_N/ with trainer.json marked
`"engine": "deepspeed"`, rng/, config.yaml, COMPLETE; written as .tmp_step_N, then renamed) with
DeepSpeed's files in step_N/deepspeed/. keel.load / `keel export hf` consolidate them with
DeepSpeed's zero_to_fp32; keel/checkpoint/deepspeed.py reshards between ZeRO layouts and
to or from keel's torch engine, weights and AdamW state.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from keel.checkpoint.dcp import load_model_weights
from keel.checkpoint.deepspeed import DS_TAG, _quiet, import_deepspeed
from keel.checkpoint.files import COMPLETE, barrier, fsync_dir, rank, resolve_checkpoint, rng_state
from keel.config import deep_merge
from keel.errors import ConfigError
from keel.model.registry import build_model
from keel.train import faults, parallel
from keel.train.init import WholeTensorWrites
from keel.train.optim import build_optimizer
from keel.train.trainer import Trainer


def check_config(cfg) -> None:
    """Refuse what the DeepSpeed engine cannot combine with, one line naming the key."""
    p, engine = cfg.parallel, "cannot be combined with parallel.engine: deepspeed"
    for key in ("tp", "pp", "cp", "dp_replicate"):
        if getattr(p, key) > 1:
            raise ConfigError(f"parallel.{key}: {getattr(p, key)} {engine} (ZeRO shards over all ranks); "
                              f"use parallel.engine: torch")
    if cfg.precision.fp8 != "off":
        raise ConfigError(f"precision.fp8: {cfg.precision.fp8} {engine}")
    if cfg.optim.name != "adamw":
        raise ConfigError(f"optim.name: {cfg.optim.name} {engine} (ZeRO steps flat partitions); use adamw")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params: needs parallel.zero_stage 3, got {p.zero_stage} "
                          f"(ZeRO-1/2 keep whole parameters on every rank)")
    if p.ds_config is not None and not isinstance(p.ds_config, (str, dict)):
        raise ConfigError(f"parallel.ds_config: expected a JSON file path or a mapping, got {p.ds_config!r}")


def generate_ds_config(cfg, dp_size: int) -> dict:
    """The DeepSpeed config of a recipe, with parallel.ds_config deep-merged over it."""
    p, t = cfg.parallel, cfg.train
    zero = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    batch = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
             "gradient_accumulation_steps": t.global_batch // (t.micro_batch * dp_size)}
    out = {**batch, "gradient_clipping": t.grad_clip, "zero_optimization": zero,
           "bf16": {"enabled": cfg.precision.dtype == "bf16"}, "steps_per_print": 2 ** 62,
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    over = p.ds_config
    if isinstance(over, str):
        try:
            over = json.loads(Path(over).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"parallel.ds_config: cannot read {over} as JSON ({e})") from None
    merged = deep_merge(out, over or {})
    for key, value in batch.items():  # keel's loop and data loader own the batch shape
        if merged[key] != value:
            raise ConfigError(f"parallel.ds_config: {key} must stay {value} (set by train.global_batch and "
                              f"train.micro_batch), got {merged[key]}")
    return merged


def _init_single_process_group(device: torch.device) -> None:
    """One process: DeepSpeed still wants a process group (else it tries MPI discovery)."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


class _PartitionedInit(WholeTensorWrites):
    """In-place writes to ZeRO-3 partitioned parameters (their `.data` is empty), made whole; this rank
    keeps its partition in `ds_tensor`: the flat parameter cut in `ds_tensor.ds_numel`-sized pieces by
    rank, as DeepSpeed partitions."""

    def concerns(self, func, target) -> bool:
        return (getattr(target, "ds_tensor", None) is not None and target.numel() == 0
                and func._overloadpacket.__name__.endswith("_"))

    def whole_like(self, target) -> torch.Tensor:
        return torch.empty(target.ds_shape, dtype=target.ds_tensor.dtype, device=self.device)

    def keep_part(self, target, whole) -> None:
        part = target.ds_tensor
        start = part.ds_numel * dist.get_rank(group=target.ds_process_group)
        count = max(0, min(part.ds_numel, target.ds_numel - start))
        part.narrow(0, 0, count).copy_(whole.view(-1).narrow(0, start, count))


def _partitioned(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The ZeRO-3 parameters of `model` that now hold only this rank's partition (empty `.data`)."""
    return [p for p in model.parameters() if getattr(p, "ds_tensor", None) is not None and p.numel() == 0]


@contextlib.contextmanager
def _whole_shapes(model: torch.nn.Module):
    """Partitioned parameters shaped as their whole tensors (zero-memory expanded views) for code
    that reads shapes only, like keel's weight-decay grouping (a 1-D parameter gets no decay)."""
    saved = [(p, p.data) for p in _partitioned(model)]
    for p, data in saved:
        p.data = torch.empty((), dtype=data.dtype, device=data.device).expand(p.ds_shape)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


class DeepSpeedTrainer(Trainer):
    """keel's Trainer with the model and optimizer wrapped in a DeepSpeed ZeRO engine."""

    def __init__(self, cfg):
        check_config(cfg)  # before any process group exists: bad combinations fail fast, in one line
        import_deepspeed()
        # DeepSpeed calls collectives that torch 2.13 deprecates, warning on every call site.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        super().__init__(cfg)

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (ZeRO partitions them)
        init_from = getattr(cfg.model, "init_from", None)
        if cfg.parallel.zero_stage == 3 and not init_from:
            model = self._build_partitioned()
        else:
            model = build_model(cfg.model, "meta")
            model.to_empty(device=self.dist.device)
            if init_from:
                model.init_buffers()
                load_model_weights(resolve_checkpoint(init_from), model)
            else:
                model.init_weights()
        parallel.apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
        if cfg.parallel.compile:
            parallel.apply_compile(model)
        self.autocast = False  # DeepSpeed's bf16 mode casts the weights itself
        return model

    def _build_partitioned(self) -> torch.nn.Module:
        """ZeRO-3: built under zero.Init (each rank allocates its partitions only), then initialised."""
        cfg, device = self.cfg, self.dist.device
        deepspeed = import_deepspeed()
        _init_single_process_group(device)
        # zero.Init reads the world size from deepspeed.comm, which deepspeed.initialize would set up.
        deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo", dist_init_required=False)
        config = generate_ds_config(cfg, self.dp_size)
        with _quiet(stderr=False), deepspeed.zero.Init(config_dict_or_path=config):
            model = build_model(cfg.model, device)
        torch.manual_seed(cfg.train.seed)  # the constructors drew; one process's init starts at the seed
        with torch.no_grad(), _PartitionedInit(device):
            model.init_weights()
        params = list(model.parameters())
        held, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
        print(f"deepspeed: ZeRO-3 model built under zero.Init: rank {self.dist.rank} holds {held} of "
              f"{total} parameter elements", flush=True)
        return model

    def _build_data(self):
        # Trainer.__init__ builds the optimizer right after the model: wrap both here, before resume.
        deepspeed, config = import_deepspeed(), generate_ds_config(self.cfg, self.dp_size)
        if _partitioned(self.model):  # the groups again, on whole shapes (a partitioned one is 1-D)
            with _whole_shapes(self.model):
                self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg.optim, self.cfg.train.steps)
        _init_single_process_group(self.dist.device)
        with _quiet(stderr=False):  # DeepSpeed prints its config on rank 0 (stderr: its one-time C++ builds)
            self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer,
                                                        config=config, dist_init_required=False)
        self.model = self.engine  # forward, train() and eval() go through the engine
        return super()._build_data()

    def train_step(self) -> dict:
        engine = self.engine
        engine.train()
        micro_batches = [self._to_device(mb) for mb in self.data.next_step()]
        global_tokens, fingerprint = self.global_counts(micro_batches)
        scale = self.dp_size / max(global_tokens, 1)  # DeepSpeed averages over dp ranks; undo that
        loss_sum = torch.zeros((), device=self.dist.device)
        for mb in micro_batches:
            loss = self.task.loss_sum(engine, mb)
            loss = faults.inject_nan(loss, self.step + 1)
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()  # an update only at the last micro-batch (the accumulation boundary)
            loss_sum += loss.detach().float()
            faults.inject_kill(self.step + 1, self.dist.rank)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        loss = self._dp_sum(loss_sum).item() / max(global_tokens, 1)
        # ZeRO skips (and clears) a step whose gradient norm is not finite, like keel does.
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and engine.was_step_applied()
        if engine.was_step_applied():
            self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": global_tokens,
                "data_fingerprint": fingerprint, "finite": finite}

    def save(self) -> Path:
        """keel's atomic protocol around engine.save_checkpoint (see keel/checkpoint/dcp.py)."""
        root, step = self.ckpt.root, self.step
        final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
        if rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        with _quiet():
            self.engine.save_checkpoint(str(tmp), tag=DS_TAG)
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank()}.pt")
        barrier()
        if rank() == 0:
            state = {"step": step, "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                     "world_size": self.dist.world_size, "dp_size": self.dp_size, "engine": "deepspeed",
                     "zero_stage": self.engine.zero_optimization_stage(), "bf16": self.engine.bfloat16_enabled(),
                     "deepspeed_tag": DS_TAG}
            (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
            (tmp / "config.yaml").write_text((self.run_dir / "config.yaml").read_text())
            (tmp / COMPLETE).write_text(f"step {step}\n")
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(root)
            self.ckpt._prune()
        barrier()
        return final
