"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, committed atomically.

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
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from keel.checkpoint import deepspeed as ds_checkpoint
from keel.checkpoint.files import (
    COMPLETE,
    barrier,
    committed_checkpoints,
    fsync_dir,
    model_differences,
    rank,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    uses_deepspeed,
)
from keel.errors import CheckpointError

# DCP says so on every single-process save/load, which is keel's normal case for keel.load/export.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# Optimizer state keyed per parameter ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not by
# per-rank parameter lists: a pipeline stage holds only some parameters, and this is what lets
# its state load into any other layout.
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
# Optimizer settings that follow from the parallel layout, not from training: kept on resume.
LAYOUT_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
def _optimizer_state(model, optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FLAT_OPTIM)


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank()}.pt")
        barrier()
        if rank() == 0:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / COMPLETE).write_text(f"step {step}\n")
            fsync_dir(tmp)
            if final.exists():  # a re-run of the same step replaces it only once the new one is whole
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            self._prune()
        barrier()
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
        if uses_deepspeed(path, model):  # a DeepSpeed checkpoint and/or engine: keel/checkpoint/deepspeed.py
            return ds_checkpoint.load_checkpoint(path, model, optimizer)
        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(model, optimizer)}
        _load_or_explain(state, path, model, "checkpoint.resume")
        set_model_state_dict(model, state["model"])
        layout_options = [{k: g[k] for k in LAYOUT_OPTIONS if k in g} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state["optim"], options=FLAT_OPTIM)
        for group, options in zip(optimizer.param_groups, layout_options):
            group.update(options)  # e.g. foreach=False under TP alone: this layout's, not the saver's
        rng_file = path / "rng" / f"rank_{rank()}.pt"
        if rng_file.is_file():  # a new rank (resume on more ranks) keeps its fresh seed
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "trainer.json").read_text())


def _load_or_explain(state: dict, path: Path, model, key: str) -> None:
    """dcp.load, with a mismatch told in one line naming the differing model settings. (DCP's
    CheckpointException derives from BaseException, so `except Exception` would miss it.)"""
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:
        config = getattr(model, "config", getattr(getattr(model, "module", None), "config", None))
        differ = model_differences(path, config) if config is not None else []
        detail = "; ".join(differ[:4]) if differ else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{key}: {path} does not fit this model ({detail})") from None


def load_model_weights(path, model, key: str = "model.init_from") -> None:
    """Fill `model` (sharded or not) with the weights of a checkpoint, ignoring its optimizer."""
    path = resolve_checkpoint(path, key)
    if uses_deepspeed(path):  # consolidated by DeepSpeed's zero_to_fp32
        return ds_checkpoint.load_consolidated_weights(path, model)
    state = {"model": get_model_state_dict(model)}
    # A model with an `init_missing_weights(keys)` hook (KSA from a dense checkpoint) initialises the
    # weights the checkpoint lacks itself, after the rest are loaded; the hook refuses what it cannot.
    missing = set()
    if hasattr(model, "init_missing_weights"):
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        missing = {k for k in state["model"] if f"model.{k}" not in saved}
        for key in missing:
            del state["model"][key]
    _load_or_explain(state, path, model, key)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not missing))
    if missing:
        model.init_missing_weights(missing)
