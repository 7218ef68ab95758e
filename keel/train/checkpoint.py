"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, committed atomically.

Layout of a run directory:
  config.yaml            the resolved recipe
  tokenizer/             the tokenizer the run trained with
  checkpoints/step_<N>/  committed checkpoints only:
      .metadata, *.distcp   DCP shards of {"model": ..., "optim": ...}
      trainer.json          step, scheduler, data position (global sample index), world size
      rng/rank_<r>.pt       every rank's RNG states
      config.yaml           the recipe, so a checkpoint folder stands alone
      COMPLETE              written last, before the rename

A checkpoint is written into `checkpoints/.tmp_step_<N>` by every rank and renamed into place by
rank 0 after all ranks have finished, so a crash at any moment leaves the last committed
checkpoint untouched. Resume picks the newest folder with a COMPLETE marker. Because DCP stores
global shapes and the data position is a global sample index, a checkpoint resumes on any world
size or FSDP/DDP layout.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from keel.errors import CheckpointError

# DCP says so on every single-process save/load, which is keel's normal case for keel.load/export.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

COMPLETE = "COMPLETE"
# Optimizer state keyed per parameter ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not by
# per-rank parameter lists: a pipeline stage holds only some parameters, and this is what lets
# its state load into any other layout.
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
# Optimizer settings that follow from the parallel layout, not from training: kept on resume.
LAYOUT_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_state(model, optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FLAT_OPTIM)


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


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / COMPLETE).is_file():
        return path
    if _STEP_DIR.match(path.name):
        raise CheckpointError(f"{path}: checkpoint is incomplete (no {COMPLETE} marker); it was never committed")
    found = committed_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"{path}: no committed checkpoint found (expected checkpoints/step_<N>/{COMPLETE})")
    return found[-1][1]


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


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        torch.save(rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / COMPLETE).write_text(f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():  # a re-run of the same step replaces it only once the new one is whole
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for _, path in committed_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        found = committed_checkpoints(self.root)
        return found[-1][1] if found else None

    def final(self, step: int, save) -> Path:
        """The checkpoint a run ends on: step `step`'s, written by `save()` unless it is the newest."""
        latest = self.latest()
        return latest if latest is not None and latest.name == f"step_{step}" else save()

    @staticmethod
    def load(path: Path, model, optimizer) -> dict:
        """Load model + optimizer + this rank's RNG from a committed checkpoint; return trainer.json."""
        path = resolve_checkpoint(path)
        if uses_deepspeed(path, model):  # a DeepSpeed checkpoint and/or engine: keel/train/deepspeed_checkpoint.py
            from keel.train.deepspeed_checkpoint import load_checkpoint
            return load_checkpoint(path, model, optimizer)
        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"])
        layout_options = [{k: g[k] for k in LAYOUT_OPTIONS if k in g} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state["optim"], options=FLAT_OPTIM)
        for group, options in zip(optimizer.param_groups, layout_options):
            group.update(options)  # e.g. foreach=False under TP alone: this layout's, not the saver's
        rng_file = path / "rng" / f"rank_{_rank()}.pt"
        if rng_file.is_file():  # a new rank (resume on more ranks) keeps its fresh seed
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "trainer.json").read_text())


def uses_deepspeed(path: Path, model=None) -> bool:
    """A checkpoint written by parallel.engine: deepspeed, or a model wrapped in a DeepSpeed engine."""
    meta = Path(path) / "trainer.json"
    if meta.is_file() and json.loads(meta.read_text()).get("engine") == "deepspeed":
        return True
    return model is not None and type(model).__name__ == "DeepSpeedEngine"


def load_model_weights(path, model) -> None:
    """Fill `model` (sharded or not) with the weights of a checkpoint, ignoring its optimizer."""
    path = resolve_checkpoint(path)
    if uses_deepspeed(path):  # consolidated by DeepSpeed's zero_to_fp32
        from keel.train.deepspeed_checkpoint import load_consolidated_weights
        return load_consolidated_weights(path, model)
    state = {"model": get_model_state_dict(model)}
    # A model with an `init_missing_weights(keys)` hook (KSA from a dense checkpoint) initialises the
    # weights the checkpoint lacks itself, after the rest are loaded; the hook refuses what it cannot.
    missing = set()
    if hasattr(model, "init_missing_weights"):
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        missing = {k for k in state["model"] if f"model.{k}" not in saved}
        for key in missing:
            del state["model"][key]
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:  # DCP raises bare errors on key or shape mismatch
        raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0][:200]})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not missing))
    if missing:
        model.init_missing_weights(missing)


# ------------------------------------------------------------ model-only checkpoints (HF import)

def write_model_checkpoint(out_dir, model_cfg, state_dict: dict, tokenizer=None) -> Path:
    """Write a run directory holding only model weights (step 0), e.g. an imported HF model.

    `keel.load(out_dir)` and `model.init_from: out_dir` read it like any other checkpoint.
    """
    import dataclasses
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False)
    (out_dir / "config.yaml").write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    tmp = out_dir / "checkpoints" / ".tmp_step_0"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dcp.save({"model": {k: v.contiguous() for k, v in state_dict.items()}}, checkpoint_id=str(tmp),
             no_dist=True)
    (tmp / "trainer.json").write_text(json.dumps({"step": 0, "imported": True}))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / COMPLETE).write_text("step 0\n")
    final = out_dir / "checkpoints" / "step_0"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return out_dir


def checkpoint_model_config(path: Path):
    """The model config stored in a committed checkpoint folder."""
    import yaml
    from keel.config import build_dataclass
    from keel.model.registry import get_model_spec

    raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    model_raw = raw.get("model")
    if not isinstance(model_raw, dict) or "name" not in model_raw:
        raise CheckpointError(f"{path / 'config.yaml'}: has no model section")
    return build_dataclass(get_model_spec(model_raw["name"]).config_cls, model_raw, "model")


def tokenizer_dir_of(path: Path) -> Optional[Path]:
    for candidate in (path / "tokenizer", path.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    return None


def load_model_checkpoint(path):
    """(model config, full fp32 state dict, tokenizer folder or None) of a checkpoint or run dir."""
    model = load_model(path)
    ckpt = resolve_checkpoint(path)
    return model.config, {k: v for k, v in model.state_dict().items()}, tokenizer_dir_of(ckpt)


def load_model(path, device: str = "cpu"):
    """A single-process model with the weights of a checkpoint or run directory."""
    from keel.model.registry import build_model

    ckpt = resolve_checkpoint(path)
    model_cfg = checkpoint_model_config(ckpt)
    model_cfg.init_from = None
    model = build_model(model_cfg, "meta")
    model.to_empty(device=device)
    model.init_buffers()
    load_model_weights(ckpt, model)
    model.eval()
    return model
