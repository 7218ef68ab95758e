"""The training loop of every family, on one process or under torchrun (DDP / FSDP2 / TP / PP / CP).

The loop knows no family: it looks the family's spec up by `model.name` and drives its training task
(keel/model/task.py) — batches, summed loss, loss units, eval metrics.

Setup order: ranks -> mesh -> task (tokenizer, ...) -> model on meta -> parallelism -> this rank's
shards -> weights (init or init_from) -> optimizer -> data -> resume -> loop. Every step: micro-batches -> forward (summed
loss) -> backward scaled by the GLOBAL count of loss units -> clip -> step -> metrics -> checkpoint.
Normalising by the global count makes the update identical however the batch is split over ranks
and micro-batches, which is what lets a checkpoint resume on another world size with the same result.
"""
from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from keel.checkpoint.dcp import Checkpointer
from keel.checkpoint.files import resolve_checkpoint
from keel.config import Config, save_resolved
from keel.data.prefetch import Prefetcher
from keel.errors import ConfigError
from keel.model.registry import build_model, get_model_spec
from keel.train import faults, init, parallel, precision
from keel.train.context_parallel import shard_batch
from keel.train.launch import DistInfo, init_distributed
from keel.train.metrics import MetricsLogger, ProgressLine, device_peak_flops, peak_memory_gib
from keel.train.optim import build_optimizer, clip_grad_norm
from keel.train.pipeline import build_pipeline
from keel.train.profile import StepProfiler


class Trainer:
    pipeline = None  # a keel.train.pipeline.Pipeline under parallel.pp > 1

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        if self.dist.device.type == "cuda":  # fp32 matmuls (fp32 recipes, the loss head) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        warning = cfg.precision.dtype == "bf16" and precision.slow_bf16_warning("precision.dtype", self.dist.device)
        if warning and self.dist.is_main:
            print(warning, file=sys.stderr, flush=True)
        self.dims = parallel.resolve_parallel_dims(cfg.parallel, self.dist.world_size)
        self.mesh = parallel.build_mesh(self.dims, self.dist.device.type)
        self.dp_rank, self.dp_size = parallel.dp_rank_and_size(self.mesh, self.dims)
        self.cp_rank = self.mesh["cp"].get_local_rank() if self.dims.cp > 1 else 0
        micro_total = cfg.train.micro_batch * self.dp_size
        if cfg.train.global_batch % micro_total:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                              f"train.micro_batch x data-parallel ranks = {micro_total}")
        self.spec = get_model_spec(cfg.model.name)
        self.task = self.spec.task(cfg)
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.task.prepare()  # e.g. the tokenizer, checked against the model's vocabulary
        self.resume_from = self._resume_path()  # a bad checkpoint.resume fails here, before any work
        self.model = self._build_model()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        self.data = self._build_data()
        if cfg.train.prefetch:
            self.data = Prefetcher(self.data, pin=self.dist.device.type == "cuda")
        self.step = self._resume()
        if self.step == 0 and not getattr(cfg.model, "init_from", None):
            self.task.on_fresh_start(self.model)
        # Only now, with everything checked and loaded, is the run directory written: a start that
        # fails leaves an existing run's config.yaml and tokenizer untouched, and makes no folder.
        self._setup_run_dir()
        self.guard = faults.StepGuard(self, cfg.train.steps)  # preemption signals and the non-finite policy
        self.metrics = MetricsLogger(self.run_dir, cfg, self.dist.is_main, self.step)
        self.peak_flops = device_peak_flops(self.dist.device)
        flops = getattr(cfg.model, "flops_per_token", None)  # a family without it gets no MFU
        self.flops_per_token = flops(cfg.data.seq_len) if flops else 0

    # ------------------------------------------------------------ setup
    def _setup_run_dir(self) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, self.run_dir / "config.yaml")
            self.task.save_assets(self.run_dir)
        if dist.is_initialized():
            dist.barrier()

    def _build_model(self) -> torch.nn.Module:
        """meta -> parallelize (TP/SP, CP, EP, pipeline cut, FSDP) -> this rank's shards on the device
        -> weights (keel/train/init.py). No rank ever holds the whole model."""
        cfg, device = self.cfg, self.dist.device
        model = build_model(cfg.model, "meta")
        self.autocast = cfg.precision.dtype == "bf16" and not parallel.uses_fsdp(self.dims)  # FSDP casts via its policy
        # Under pp each of this rank's stages is cut from the whole model, then parallelized alone.
        self.pipeline = build_pipeline(model, self.mesh, self.dims, cfg, self._parallelize, device, self.dp_size)
        if self.pipeline is None:
            trained = self._parallelize(model)
            parts = [trained]
        else:
            trained, parts = self.pipeline.container, self.pipeline.parts
        init.materialize(parts, device)
        init.initialize_weights(model, parts, device, cfg.train.seed, getattr(cfg.model, "init_from", None),
                                load_into=trained)
        return trained

    def _parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg, fsdp = self.cfg, parallel.uses_fsdp(self.dims)
        precision.apply_fp8(model, cfg.precision, fsdp)
        param_dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" and fsdp else None
        return parallel.parallelize(model, self.mesh, self.dims, cfg.parallel, self.spec.tp_plan, param_dtype)

    def _build_data(self):
        return self.task.build_data(dp_rank=self.dp_rank, dp_size=self.dp_size)

    def _resume_path(self) -> Path | None:
        """The checkpoint `checkpoint.resume` names: auto (newest complete in the run directory),
        never, a step number of this run, or a checkpoint / run directory path."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            return self.ckpt.latest()
        if isinstance(mode, int) or str(mode).isdigit():
            step_dir = self.ckpt.root / f"step_{int(mode)}"
            if not step_dir.is_dir():
                steps = [p.name.removeprefix("step_") for p in sorted(self.ckpt.root.glob("step_*"))]
                raise ConfigError(f"checkpoint.resume: {self.run_dir.absolute()} has no checkpoint at step {mode} "
                                  f"(committed: {', '.join(steps) or 'none'})")
            return resolve_checkpoint(step_dir, "checkpoint.resume")
        if "/" not in str(mode) and not Path(mode).exists():  # a word, not a path: e.g. "latest"
            raise ConfigError(f"checkpoint.resume: {mode!r} is neither auto, never, a step number nor an existing "
                              f"checkpoint or run directory (the newest checkpoint is `auto`)")
        return resolve_checkpoint(mode, "checkpoint.resume")

    def _resume(self) -> int:
        if self.resume_from is None:
            return 0
        state = self.restore(self.resume_from)
        if self.dist.is_main:
            print(f"keel: resumed from {self.resume_from.absolute()} (step {state['step']}, saved on "
                  f"{state['world_size']} ranks)", flush=True)
        return state["step"]

    def restore(self, path: Path) -> dict:
        """Load a committed checkpoint into this trainer: weights, optimizer, scheduler, data
        position and RNG (at start-up, and for an in-process rollback). Returns trainer.json."""
        state = Checkpointer.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        return state

    # ------------------------------------------------------------ loop
    def _autocast(self):
        return precision.forward_context(self.cfg.precision, self.dist.device, self.autocast)

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        return parallel.data_all_reduce_sum(value, self.mesh)

    def _cp_shard(self, batch: dict) -> dict:
        if self.dims.cp == 1:
            return batch
        return shard_batch(batch, self.cp_rank, self.dims.cp)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def _counts(self, micro_batches: list[dict]) -> torch.Tensor:
        """[loss units, content fingerprint] of the step, summed over every rank, on the device (no
        host sync): units are what the loss is normalised by (tokens that carry a label, for an LM);
        the fingerprint shows at a glance that a resumed run saw the same data."""
        local = torch.stack([sum(self.task.units(mb).to(torch.int64) for mb in micro_batches),
                             sum(self.task.fingerprint(mb).to(torch.int64) for mb in micro_batches)])
        return self._dp_sum(local.to(self.dist.device))

    def global_counts(self, micro_batches: list[dict]) -> tuple[int, int]:
        units, fingerprint = self._counts(micro_batches).tolist()
        return units, fingerprint

    def train_step(self) -> dict:
        self.model.train()
        micro_batches = [self._to_device(self._cp_shard(mb)) for mb in self.data.next_step()]
        counts = self._counts(micro_batches)
        preempt = self.guard.flag.poll(self.dist.device)  # joins the step's one host sync below
        # DDP/FSDP average gradients over the ranks holding different tokens; undo that. A device
        # tensor: the host need not wait for the count before the forward.
        scale = (self.dp_size * self.dims.cp) / counts[0].clamp(min=1).float()
        # Under pp the schedule runs every micro-batch through the stages; else one after another.
        run = self._forward_backward if self.pipeline is None else self.pipeline.train_step
        loss_sum = run(micro_batches, scale)
        faults.inject_kill(self.step + 1, self.dist.rank)  # under pp the first chance is after the schedule
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm, **self._pipeline_norm_args())
        lr = self.scheduler.get_last_lr()[0]
        # The step's single host sync: everything the loop decides on, in one transfer (float64
        # holds the integer counts exactly).
        host = torch.stack([self._dp_sum(loss_sum).double(), grad_norm.double().to(self.dist.device),
                            counts[0].double(), counts[1].double(), preempt.double()]).tolist()
        loss_total, grad_norm, tokens, fingerprint, signal = host
        self.guard.flag.settle(int(signal))
        loss = loss_total / max(tokens, 1)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # the same on every rank
        if finite:  # a NaN/Inf step never reaches the weights; train.nonfinite decides what follows
            self.optimizer.step()
            self.scheduler.step()
            precision.after_optimizer_step(self.model, self.cfg.precision, parallel.uses_fsdp(self.dims))
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": int(tokens),
                "data_fingerprint": int(fingerprint), "finite": finite, "moe": self._moe_balance_step()}

    def _moe_balance_step(self) -> dict:
        """A model with MoE layers updates its balancing biases from this step's expert loads
        (summed over data ranks), outside the gradient; its per-layer load metrics join the row."""
        update = getattr(self.model, "update_moe_balance", None)
        if update is None:
            return {}
        update(self._dp_sum)
        metrics = self.model.moe_metrics()
        return metrics if self.pipeline is None else self.pipeline.merge_stage_metrics(metrics)

    def _forward_backward(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """Gradients of scale * (summed token loss) over the micro-batches; returns the loss sum."""
        loss_sum = torch.zeros((), device=self.dist.device)
        for i, mb in enumerate(micro_batches):
            if self.mesh is not None and (parallel.uses_fsdp(self.dims) or self.dims.dp_replicate > 1):
                self.model.set_requires_gradient_sync(
                    parallel.gradient_sync_on(i, len(micro_batches), self.dims, self.cfg.parallel))
            with self._autocast():
                loss = self.task.loss_sum(self.model, mb)
            loss = faults.inject_nan(loss, self.step + 1)  # fault injection (tests): KEEL_FAULT_NAN_AT_STEP
            (loss * scale).backward()
            loss_sum += loss.detach().float()
            faults.inject_kill(self.step + 1, self.dist.rank)  # fault injection (tests): KEEL_FAULT_KILL_*
        return loss_sum

    def _eval_sums(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """The task's eval sums over `batches`, forward only (under pp: the pipeline's loss sum)."""
        if self.pipeline is not None:
            return {"loss": self.pipeline.evaluate(batches),
                    "units": sum(self.task.units(mb).float() for mb in batches)}
        sums: dict[str, torch.Tensor] = {}
        for mb in batches:
            for name, value in self.task.eval_sums(self.model, mb).items():
                sums[name] = sums.get(name, 0) + value.float()
        return sums

    def _pipeline_norm_args(self) -> dict:
        if self.pipeline is None:
            return {}
        return {"sum_group": self.pipeline.group, "skip": self.pipeline.norm_skip()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        batches = [self._to_device(self._cp_shard(b)) for b in self.data.eval_batches(
            self.cfg.train.eval_batches, self.cfg.train.micro_batch, self.dp_rank, self.dp_size)]
        if not batches:  # no held-out data (data.eval_fraction 0): the same on every rank
            return {}
        with self._autocast():
            sums = self._eval_sums(batches)
        names = sorted(sums)
        totals = self._dp_sum(torch.stack([sums[n].reshape(()) for n in names]).to(self.dist.device)).tolist()
        return self.task.eval_metrics(dict(zip(names, totals)))

    def save(self) -> Path:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                 "world_size": self.dist.world_size, "dp_size": self.dp_size}
        return self.ckpt.save(self.step, self.model, self.optimizer, state,
                              (self.run_dir / "config.yaml").read_text() if self.dist.is_main else "")

    def _say(self, text: str, progress: ProgressLine) -> None:
        """A line per phase (eval, saved, ...) on rank 0, clear of the live progress line."""
        if self.dist.is_main:
            if progress.enabled:
                progress.message(f"keel: {text}")
            else:
                print(f"keel: {text}", flush=True)

    def _banner(self) -> str:
        cfg, dims = self.cfg, self.dims
        count = getattr(cfg.model, "num_params", None)
        params = count() if count else sum(p.numel() for p in self.model.parameters())
        layout = " x ".join(f"{name} {getattr(dims, name)}" for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp")
                            if getattr(dims, name) > 1) or "one process"
        if cfg.parallel.ep > 1:  # not a mesh factor: experts are sharded over groups of data-parallel ranks
            layout += f" (experts: ep {cfg.parallel.ep})"
        return (f"{cfg.model.name}, {params / 1e6:.1f}M parameters | {self.dist.world_size} rank(s): {layout} | "
                f"{self.task.step_size(cfg.train.global_batch)} | steps {self.step} -> "
                f"{cfg.train.steps} | run {self.run_dir.absolute()}")

    def _eta(self, step_seconds: list[float], phase_seconds: dict) -> float:
        """Seconds left: training steps at their recent pace, plus the evaluations and checkpoints
        still to come at their measured cost (the final ones included)."""
        cfg, left = self.cfg, range(self.step + 1, self.cfg.train.steps + 1)
        recent = step_seconds[-20:]
        evals = sum(1 for s in left if s == cfg.train.steps or (cfg.train.eval_every and s % cfg.train.eval_every == 0))
        saves = sum(1 for s in left if cfg.checkpoint.every and s % cfg.checkpoint.every == 0)
        saves += 0 if cfg.checkpoint.every and cfg.train.steps % cfg.checkpoint.every == 0 else 1  # the final one
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return (mean(recent) * len(left) + evals * mean(phase_seconds["eval"])
                + saves * mean(phase_seconds["save"] or phase_seconds["eval"][:0]))

    def train(self) -> dict:
        cfg = self.cfg
        progress = ProgressLine(cfg.train.steps, self.step, cfg.logging.progress and self.dist.is_main,
                                unit=self.task.unit_name)
        self._say(self._banner(), progress)
        summary = {}
        step_seconds: list[float] = []
        phase_seconds: dict = {"eval": [], "save": []}
        guard = self.guard
        profiler = StepProfiler(cfg.train.profile_steps, self.run_dir, self.dist.device, self.dist.rank)
        gc_every = cfg.train.gc_every
        if gc_every:  # collected on a schedule below, at the same step on every rank
            gc.collect()
            gc.disable()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            with profiler.step(self.step + 1):
                out = self.train_step()
            if gc_every and (self.step + 1) % gc_every == 0:
                gc.collect(1)
            self.step += 1
            dt = time.perf_counter() - t0
            step_seconds.append(dt)
            tps = out["tokens"] / dt
            row = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens_per_s": tps,
                   "step_time_s": dt, "peak_mem_gib": peak_memory_gib(self.dist.device),
                   "data_fingerprint": out["data_fingerprint"], **out.get("moe", {})}
            if self.peak_flops:
                row["mfu"] = self.flops_per_token * tps / (self.peak_flops * self.dist.world_size)
            if not out["finite"] and guard.on_nonfinite(row):  # skip: go on | rollback: replay | stop: raise
                continue
            last = self.step == cfg.train.steps
            if last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
                t_eval = time.perf_counter()
                metrics = self.evaluate()
                phase_seconds["eval"].append(time.perf_counter() - t_eval)
                row.update(metrics)
                if metrics and not last:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    self._say(f"eval at step {self.step}: {shown}", progress)
            if self.step % cfg.train.log_every == 0 or last:
                self.metrics.log(self.step, row)
            progress.update(self.step, out["loss"], out["lr"], tps, self._eta(step_seconds, phase_seconds))
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                t_save = time.perf_counter()
                path = self.save()
                phase_seconds["save"].append(time.perf_counter() - t_save)
                if not last:
                    self._say(f"saved {path.absolute()} ({phase_seconds['save'][-1]:.1f} s)", progress)
            summary = row
            if guard.preempted():  # SIGUSR1/SIGTERM on any rank: stop here, on a checkpoint
                break
        progress.close()
        if gc_every:
            gc.enable()
        if profiler.written:
            self._say(f"profile: {len(profiler.written)} file(s) in {profiler.out.absolute()}", progress)
        if not summary:  # resumed at the last step: nothing left to train, evaluate what is there
            summary = self.evaluate()
        summary["checkpoint"] = str(self.ckpt.final(self.step, self.save))  # always end on a checkpoint
        self._say(f"saved {Path(summary['checkpoint']).absolute()} (step {self.step})", progress)
        summary["wandb_dir"] = self.metrics.wandb_dir
        self.metrics.close()
        return guard.finish(summary)  # a preempted run: summary["preempted"], requeue marker
