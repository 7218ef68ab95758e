"""Fault tolerance inside the training loop, and the fault injection that tests it.

- Preemption: SIGUSR1 / SIGTERM (see launch.PreemptionFlag) -> every rank finishes the current
  step, one checkpoint is committed, rank 0 writes `<run dir>/PREEMPTED`, and the process exits:
  code 75 (EX_TEMPFAIL, "try again") on its own, but 0 under torchrun, where any failure code
  would make torchrun restart the workers (--max-restarts) instead of letting the job end. The
  SLURM job script requeues the job when it finds PREEMPTED; the requeued job resumes from the
  checkpoint by itself (checkpoint.resume: auto).
- Non-finite steps: a NaN or Inf loss or gradient norm never reaches the weights (the trainer skips
  optimizer.step for it); `train.nonfinite` then decides: `skip` the step (its batch is dropped, the
  learning-rate schedule does not advance), `rollback` to the last committed checkpoint in-process
  and replay from there (once per step: a step that fails again after a rollback is not a
  transient fault and stops the run), or `stop` with a clear error. Each case is logged to stderr
  and in metrics.jsonl (`"nonfinite": <policy>` on that step's row).
- Fault injection, by environment variable (tests only):
    KEEL_FAULT_KILL_AT_STEP=N  SIGKILL this process midway through step N
    KEEL_FAULT_KILL_RANK=R     ... only on global rank R (default: every rank)
    KEEL_FAULT_NAN_AT_STEP=N   make the loss NaN in step N on every rank, once per process (a
                               transient fault: a replay of step N after a rollback is clean)
  A kill never fires in a group torchrun has restarted (TORCHELASTIC_RESTART_COUNT > 0), so the
  restarted run can pass the step it died in.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.train.launch import preemption_flag

KILL_AT_STEP_ENV = "KEEL_FAULT_KILL_AT_STEP"
KILL_RANK_ENV = "KEEL_FAULT_KILL_RANK"
NAN_AT_STEP_ENV = "KEEL_FAULT_NAN_AT_STEP"
REQUEUE_MARKER = "PREEMPTED"
PREEMPTED_EXIT_CODE = 75


class NonFiniteError(KeelError):
    """A NaN/Inf loss or gradient under train.nonfinite=stop (or a rollback that cannot help)."""


# ---------------------------------------------------------------- fault injection (tests)

def inject_kill(step: int, rank: int) -> None:
    """Fault injection: SIGKILL this process if KEEL_FAULT_KILL_AT_STEP (and _RANK) say so."""
    if os.environ.get(KILL_AT_STEP_ENV) != str(step):
        return
    if os.environ.get(KILL_RANK_ENV, str(rank)) != str(rank):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    os.kill(os.getpid(), signal.SIGKILL)


_nan_injected = False


def inject_nan(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Fault injection: a NaN loss at step KEEL_FAULT_NAN_AT_STEP, the first time that step runs."""
    global _nan_injected
    if _nan_injected or os.environ.get(NAN_AT_STEP_ENV) != str(step):
        return loss
    _nan_injected = True
    return loss * float("nan")


# ---------------------------------------------------------------- the training loop's guard

def preempted_exit_code() -> int:
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else PREEMPTED_EXIT_CODE


class StepGuard:
    """What the trainer asks after every step: was it finite, and has the job been preempted?"""

    def __init__(self, trainer, total_steps: int):
        self.trainer, self.total_steps = trainer, total_steps
        self.flag = preemption_flag()
        self.preempted_by = None
        self.rolled_back_from: set[int] = set()
        self.marker = Path(trainer.run_dir) / REQUEUE_MARKER
        if trainer.dist.is_main:
            self.marker.unlink(missing_ok=True)  # a marker left by an earlier, now resumed, run

    def _say(self, text: str) -> None:
        if self.trainer.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    def on_nonfinite(self, row: dict) -> bool:
        """Apply train.nonfinite to the step just run (no update was applied). True when the
        trainer rolled back, so the loop must go on from the restored step."""
        t = self.trainer
        policy, step = t.cfg.train.nonfinite, t.step
        row["nonfinite"] = policy
        what = f"step {step}: loss {row['loss']}, grad norm {row['grad_norm']}"
        if policy == "skip":
            self._say(f"keel: warning: {what}: update skipped (train.nonfinite=skip)")
            return False
        t.metrics.log(step, row)
        latest = t.ckpt.latest()
        if policy == "rollback":
            if latest is None:
                raise NonFiniteError(f"{what}: train.nonfinite is 'rollback' but there is no committed "
                                     f"checkpoint in {t.ckpt.root} yet (set checkpoint.every)")
            if step in self.rolled_back_from:
                raise NonFiniteError(f"{what} again after rolling back to {latest.name}: the fault repeats, "
                                     f"so it is not transient (bad data or divergence); stopping. Lower "
                                     f"optim.lr or set train.nonfinite=skip")
            self.rolled_back_from.add(step)
            t.restore(latest)
            self._say(f"keel: warning: {what}: rolled back to {latest} (train.nonfinite=rollback)")
            return True
        raise NonFiniteError(f"{what}: stopped because train.nonfinite is 'stop'; the last committed "
                             f"checkpoint is {latest or 'none'} (train.nonfinite=skip or rollback go past such steps)")

    def preempted(self) -> bool:
        """True on every rank once any rank got SIGUSR1/SIGTERM. The trainer's step polls the flag
        (a collective) and settles it in its one host sync; a loop that does not (RL) polls here."""
        t = self.trainer
        if not self.flag.settled:
            self.flag.settle(int(self.flag.poll(t.dist.device).item()))
        self.flag.settled = False
        if self.preempted_by is None and t.step < self.total_steps and self.flag.agreed:
            self.preempted_by = self.flag.signal_name
        return self.preempted_by is not None

    def finish(self, summary: dict) -> dict:
        """After the final checkpoint: mark a preempted run so that its job gets requeued."""
        if self.preempted_by is None:
            return summary
        summary["preempted"] = self.preempted_by
        if self.trainer.dist.is_main:
            self.marker.write_text(json.dumps({"signal": self.preempted_by, "step": self.trainer.step,
                                               "checkpoint": summary.get("checkpoint")}) + "\n")
            self._say(f"keel: preempted by {self.preempted_by} after step {self.trainer.step}: checkpoint "
                      f"{summary.get('checkpoint')} committed; exiting so that the job can be requeued "
                      f"(the next run resumes from it)")
        return summary
