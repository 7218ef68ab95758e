"""The training loop for pretraining and SFT, on one process or under torchrun (DDP / FSDP2).

Setup order: ranks -> mesh -> model on meta -> weights (init or init_from) -> data parallelism ->
optimizer -> data -> resume -> loop. Every step: micro-batches -> forward (summed token loss) ->
backward scaled by the GLOBAL token count -> clip -> step -> metrics -> checkpoint. Normalising by
the global token count makes the update identical however the batch is split over ranks and
micro-batches, which is what lets a checkpoint resume on another world size with the same result.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from keel.config import Config, save_resolved
from keel.errors import ConfigError
from keel.model.registry import build_model, get_model_spec
from keel.train import faults, parallel, precision
from keel.train.checkpoint import Checkpointer, load_model_weights, resolve_checkpoint
from keel.train.launch import DistInfo, init_distributed
from keel.train.metrics import MetricsLogger, ProgressLine, device_peak_flops, peak_memory_gib
from keel.train.optim import build_optimizer, clip_grad_norm
from keel.train.pipeline import build_pipeline


class Trainer:
    pipeline = None  # a keel.train.pipeline.Pipeline under parallel.pp > 1

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        self.dims = parallel.resolve_parallel_dims(cfg.parallel, self.dist.world_size)
        self.mesh = parallel.build_mesh(self.dims, self.dist.device.type)
        self.dp_rank, self.dp_size = parallel.dp_rank_and_size(self.mesh, self.dims)
        self.cp_rank = self.mesh["cp"].get_local_rank() if self.dims.cp > 1 else 0
        micro_total = cfg.train.micro_batch * self.dp_size
        if cfg.train.global_batch % micro_total:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                              f"train.micro_batch x data-parallel ranks = {micro_total}")
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self._setup_run_dir()
        self.model = self._build_model()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.train.steps)
        self.data = self._build_data()
        self.step = self._resume()
        self.metrics = MetricsLogger(self.run_dir, cfg, self.dist.is_main, self.step)
        self.peak_flops = device_peak_flops(self.dist.device)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)

    # ------------------------------------------------------------ setup
    def _setup_run_dir(self) -> None:
        from keel.data.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.load(self.cfg.data.tokenizer)
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {self.cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size}, data.tokenizer)")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, self.run_dir / "config.yaml")
            self.tokenizer.save(self.run_dir / "tokenizer")
        if dist.is_initialized():
            dist.barrier()

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, "meta")
        fsdp = parallel.uses_fsdp(self.dims)
        # FSDP shards weights that already exist: materialise on CPU, init, then shard. Every rank
        # thus starts from exactly the single-process initialisation.
        model.to_empty(device="cpu" if fsdp else self.dist.device)
        if cfg.model.init_from:
            model.init_buffers()
            load_model_weights(resolve_checkpoint(cfg.model.init_from), model)
        else:
            model.init_weights()
        self.autocast = cfg.precision.dtype == "bf16" and not fsdp  # FSDP casts through its mixed-precision policy
        # Under pp each of this rank's stages is cut from the whole model, then parallelized alone.
        self.pipeline = build_pipeline(model, self.mesh, self.dims, cfg, self._parallelize, self.dist.device,
                                       self.dp_size)
        return self._parallelize(model) if self.pipeline is None else self.pipeline.container

    def _parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg, fsdp = self.cfg, parallel.uses_fsdp(self.dims)
        precision.apply_fp8(model, cfg.precision, fsdp)
        param_dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" and fsdp else None
        model = parallel.parallelize(model, self.mesh, self.dims, cfg.parallel, get_model_spec(cfg.model.name).tp_plan,
                                     param_dtype)
        if fsdp and self.dist.device.type != "cpu":
            model.to(self.dist.device)
        return model

    def _build_data(self):
        from keel.data.assets import keel_home
        from keel.data.loader import build_train_data

        cache = Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else keel_home() / "data"
        return build_train_data(self.cfg.data, self.tokenizer, global_batch=self.cfg.train.global_batch,
                                micro_batch=self.cfg.train.micro_batch, dp_rank=self.dp_rank,
                                dp_size=self.dp_size, seed=self.cfg.train.seed, cache_dir=cache)

    def _resume(self) -> int:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return 0
        path = self.ckpt.latest() if mode == "auto" else resolve_checkpoint(mode)
        if path is None:
            return 0
        state = self.restore(path)
        if self.dist.is_main:
            print(f"keel: resumed from {path} (step {state['step']}, saved on {state['world_size']} ranks)",
                  flush=True)
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
        from keel.train.context_parallel import shard_batch
        return shard_batch(batch, self.cp_rank, self.dims.cp)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict:
        self.model.train()
        micro_batches = [self._to_device(self._cp_shard(mb)) for mb in self.data.next_step()]
        # Tokens that carry loss, and a fingerprint of the batch's content (sum of its token ids),
        # both over every rank: the fingerprint shows at a glance that a resumed run saw the same data.
        local = torch.tensor([sum(int((mb["labels"] != -100).sum()) for mb in micro_batches),
                              sum(int(mb["input_ids"].sum()) for mb in micro_batches)], dtype=torch.int64)
        global_tokens, fingerprint = self._dp_sum(local.to(self.dist.device)).tolist()
        # DDP/FSDP average gradients over the ranks holding different tokens; undo that.
        scale = self.dp_size * self.dims.cp / max(global_tokens, 1)
        # Under pp the schedule runs every micro-batch through the stages; else one after another.
        run = self._forward_backward if self.pipeline is None else self.pipeline.train_step
        loss_sum = run(micro_batches, scale)
        faults.inject_kill(self.step + 1, self.dist.rank)  # under pp the first chance is after the schedule
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm, **self._pipeline_norm_args())
        lr = self.scheduler.get_last_lr()[0]
        loss = self._dp_sum(loss_sum).item() / max(global_tokens, 1)
        finite = math.isfinite(loss) and math.isfinite(float(grad_norm))  # the same on every rank
        if finite:  # a NaN/Inf step never reaches the weights; train.nonfinite decides what follows
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr, "tokens": global_tokens,
                "data_fingerprint": fingerprint, "finite": finite}

    def _forward_backward(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """Gradients of scale * (summed token loss) over the micro-batches; returns the loss sum."""
        loss_sum = torch.zeros((), device=self.dist.device)
        for i, mb in enumerate(micro_batches):
            if parallel.uses_fsdp(self.dims):
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with self._autocast():
                loss = self.model(mb["input_ids"], labels=mb["labels"], positions=mb["positions"],
                                  doc_ids=mb["doc_ids"])
            loss = faults.inject_nan(loss, self.step + 1)  # fault injection (tests): KEEL_FAULT_NAN_AT_STEP
            (loss * scale).backward()
            loss_sum += loss.detach().float()
            faults.inject_kill(self.step + 1, self.dist.rank)  # fault injection (tests): KEEL_FAULT_KILL_*
        return loss_sum

    def _loss_sum(self, batches: list[dict]) -> torch.Tensor:
        """Summed token loss over `batches`, forward only."""
        if self.pipeline is not None:
            return self.pipeline.evaluate(batches)
        return sum(self.model(mb["input_ids"], labels=mb["labels"], positions=mb["positions"],
                              doc_ids=mb["doc_ids"]).float() for mb in batches)

    def _pipeline_norm_args(self) -> dict:
        if self.pipeline is None:
            return {}
        return {"sum_group": self.pipeline.group, "skip": self.pipeline.norm_skip()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        batches = [self._to_device(self._cp_shard(b)) for b in self.data.eval_batches(
            self.cfg.train.eval_batches, self.cfg.train.micro_batch, self.dp_rank, self.dp_size)]
        totals = torch.zeros(2, device=self.dist.device)
        with self._autocast():
            totals[0] += self._loss_sum(batches)
        totals[1] += sum(int((mb["labels"] != -100).sum()) for mb in batches)
        loss_sum, tokens = self._dp_sum(totals).tolist()
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> Path:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                 "world_size": self.dist.world_size, "dp_size": self.dp_size}
        return self.ckpt.save(self.step, self.model, self.optimizer, state,
                              (self.run_dir / "config.yaml").read_text() if self.dist.is_main else "")

    def train(self) -> dict:
        cfg = self.cfg
        progress = ProgressLine(cfg.train.steps, self.step, cfg.logging.progress and self.dist.is_main)
        summary = {}
        guard = faults.StepGuard(self)  # preemption signals and the non-finite policy
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            out = self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            tps = out["tokens"] / dt
            row = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens_per_s": tps,
                   "step_time_s": dt, "peak_mem_gib": peak_memory_gib(self.dist.device),
                   "data_fingerprint": out["data_fingerprint"]}
            if self.peak_flops:
                row["mfu"] = self.flops_per_token * tps / (self.peak_flops * self.dist.world_size)
            if not out["finite"] and guard.on_nonfinite(row):  # skip: go on | rollback: replay | stop: raise
                continue
            last = self.step == cfg.train.steps
            if last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
                row.update(self.evaluate())
            if self.step % cfg.train.log_every == 0 or last:
                self.metrics.log(self.step, row)
            progress.update(self.step, out["loss"], out["lr"], tps)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
            summary = row
            if guard.preempted():  # SIGUSR1/SIGTERM on any rank: stop here, on a checkpoint
                break
        progress.close()
        if not summary:  # resumed at the last step: nothing left to train, evaluate what is there
            summary = {"loss": float("nan"), **self.evaluate()}
        summary["checkpoint"] = str(self.ckpt.final(self.step, self.save))  # always end on a checkpoint
        summary["wandb_dir"] = self.metrics.wandb_dir
        self.metrics.close()
        return guard.finish(summary)  # a preempted run: summary["preempted"], requeue marker
