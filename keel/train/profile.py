"""`train.profile_steps`: a torch profiler trace of chosen steps, and on CUDA a memory snapshot.

Each rank writes into RUN/profile/: `step_<N>_rank<R>.json` (Chrome trace: open in Perfetto or
chrome://tracing) and, on CUDA, `step_<N>_rank<R>_memory.pickle` (drag into
https://pytorch.org/memory_viz). Nothing is recorded on other steps, so profiling costs nothing
unless asked for.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# Enough allocation events for a step of a large model; the snapshot keeps the newest ones.
_MEMORY_EVENTS = 200_000


class StepProfiler:
    def __init__(self, steps: list[int], run_dir: Path, device: torch.device, rank: int):
        self.steps = set(steps)
        self.out = Path(run_dir) / "profile"
        self.device = device
        self.rank = rank
        self.written: list[Path] = []

    @contextlib.contextmanager
    def step(self, step: int):
        """Profile the enclosed code when `step` is one of train.profile_steps."""
        if step not in self.steps:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        cuda = self.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_EVENTS)
        name = f"step_{step}_rank{self.rank}"
        with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            yield
        trace = self.out / f"{name}.json"
        prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if cuda:
            snapshot = self.out / f"{name}_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
