"""Metrics: metrics.jsonl, Weights & Biases, and a live progress line (rank 0 only).

tokens/s counts every rank's tokens; MFU divides achieved FLOP/s by the device's dense bf16 peak
(GPU only: a CPU has no meaningful peak to quote).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLine:
    """`step 12/200 | loss 5.43 | lr 3.0e-04 | 8.1k tok/s | ETA 1m23s`, redrawn in place on a
    terminal and printed every ~5% of the run otherwise (logs, CI)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, unit: str = "tok"):
        self.total, self.start, self.enabled, self.unit = total_steps, start_step, enabled, unit
        self.tty = sys.stdout.isatty()
        self.every = max(1, total_steps // 20)
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eta: float | None = None) -> None:
        """`eta`: the caller's estimate of the seconds left (training, evals and checkpoints to come);
        default: the average wall time per step so far times the steps left."""
        if not self.enabled:
            return
        done = step - self.start
        if eta is None:
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s / 1e3:.1f}k {self.unit}/s | ETA {format_duration(eta)}")
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        elif step % self.every == 0 or step == self.total or done == 1:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, is_main: bool, resume_step: int):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not is_main:
            return
        self._truncate_after(resume_step)
        if cfg.logging.wandb != "disabled":
            self.wandb_run = self._init_wandb(Path(run_dir), cfg)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows past the checkpoint: the resumed run logs those steps again."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(row + "\n" for row in rows))

    @staticmethod
    def _init_wandb(run_dir: Path, cfg):
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=cfg.logging.project, name=cfg.run.name, id=run_id, resume="allow",
                          dir=str(run_dir), mode=cfg.logging.wandb, config=cfg.to_dict())

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    @property
    def wandb_dir(self) -> Optional[str]:
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
