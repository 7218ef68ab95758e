"""Committed checkpoint folders on disk: finding them, their markers, ranks' RNG states.

The shared ground of keel/checkpoint/dcp.py and keel/checkpoint/deepspeed.py (both import it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from keel.errors import CheckpointError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint under ckpt_root, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path, key: str = "") -> Path:
    """A checkpoint folder from a checkpoint folder or a run directory (its newest checkpoint).
    `key` (e.g. "checkpoint.resume") starts the error message when the recipe named the path."""
    where = f"{key}: " if key else ""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"{where}{path}: no such checkpoint or run directory")
    if (path / COMPLETE).is_file():
        return path
    if _STEP_DIR.match(path.name):
        raise CheckpointError(f"{where}{path}: checkpoint is incomplete (no {COMPLETE} marker); it was never committed")
    found = committed_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"{where}{path}: no committed checkpoint found (expected checkpoints/step_<N>/{COMPLETE})")
    return found[-1][1]


def model_differences(path: Path, model_cfg) -> list[str]:
    """`model.KEY saved vs recipe` for every model setting where a checkpoint's config.yaml and
    `model_cfg` differ (init_from aside): what to name when its weights do not fit."""
    config = Path(path) / "config.yaml"
    saved = (yaml.safe_load(config.read_text()) or {}).get("model", {}) if config.is_file() else {}
    ours = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else {}
    return [f"model.{k} {saved[k]!r} in the checkpoint, {ours[k]!r} in the recipe"
            for k in ours if k in saved and k != "init_from" and saved[k] != ours[k]]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def uses_deepspeed(path: Path, model=None) -> bool:
    """A checkpoint written by parallel.engine: deepspeed, or a model wrapped in a DeepSpeed engine."""
    meta = Path(path) / "trainer.json"
    if meta.is_file() and json.loads(meta.read_text()).get("engine") == "deepspeed":
        return True
    return model is not None and type(model).__name__ == "DeepSpeedEngine"


def tokenizer_dir_of(path: Path) -> Optional[Path]:
    for candidate in (path / "tokenizer", path.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir_beside(out: Path) -> Path:
    """A temporary folder next to `out` (same file system, so the final rename is atomic), with the
    mode a plain mkdir would give under the user's umask: mkdtemp's 0700 would hide an export from
    the serving or vLLM account on a shared cluster."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def follow_umask(root: Path) -> None:
    """Give every file and folder under `root` the mode open()/mkdir() would under the umask (some
    writers, safetensors among them, create their files 0600)."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def refuse_non_empty(out: Path) -> None:
    """Outputs go to a new or empty folder: nothing a user made is ever written over."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty folder; choose a new output folder")


@contextlib.contextmanager
def new_folder(out: Path):
    """Build a new folder at `out` in a temporary folder beside it, renamed into place once whole
    (`with new_folder(out) as tmp: ...write into tmp...`): `out` appears complete or not at all, with
    the umask's modes, and an existing non-empty `out` is refused before anything is written."""
    out = Path(out).absolute()
    refuse_non_empty(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir_beside(out)
    try:
        yield tmp
        follow_umask(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
