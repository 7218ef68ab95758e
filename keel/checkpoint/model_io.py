"""Model-only checkpoints: a run directory holding just weights (an HF import, a seed checkpoint),
and single-process loading of any checkpoint's model (`keel.load`, export, RL policies)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from keel.checkpoint.dcp import load_model_weights
from keel.checkpoint.files import (
    COMPLETE,
    barrier,
    follow_umask,
    make_temp_dir_beside,
    new_folder,
    rank,
    refuse_non_empty,
    resolve_checkpoint,
    tokenizer_dir_of,
)
from keel.errors import CheckpointError
from keel.model.registry import build_model, model_config_from_dict


def write_model_checkpoint(out_dir, model_cfg, state_dict: dict, tokenizer=None) -> Path:
    """Write a run directory holding only model weights (step 0), e.g. an imported HF model.

    `keel.load(out_dir)` and `model.init_from: out_dir` read it like any other checkpoint.
    """
    out_dir = Path(out_dir).absolute()
    # An existing run or import is never mixed into or written over; the folder appears whole or not at all.
    with new_folder(out_dir) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        step = tmp / "checkpoints" / "step_0"
        step.mkdir(parents=True)
        dcp.save({"model": {k: v.contiguous() for k, v in state_dict.items()}}, checkpoint_id=str(step),
                 no_dist=True)
        _describe_step0(tmp, model_cfg, {"imported": True})
    return out_dir


def _describe_step0(root: Path, model_cfg, trainer_state: dict) -> None:
    """The files beside a model-only step_0's weights: the model config (in the run folder and the
    step), trainer.json, and COMPLETE last."""
    step = root / "checkpoints" / "step_0"
    config_yaml = yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False)
    for folder in (root, step):
        (folder / "config.yaml").write_text(config_yaml)
    (step / "trainer.json").write_text(json.dumps({"step": 0, **trainer_state}))
    (step / COMPLETE).write_text("step 0\n")


def write_sharded_model_checkpoint(out_dir, model_cfg, model, trainer_state: dict) -> Path:
    """Like write_model_checkpoint, for a model sharded over the live process group (a seed
    checkpoint written by `keel init` under torchrun): every rank writes its own shards with DCP into
    a temporary folder beside `out_dir`, which rank 0 renames into place once all are whole."""
    out_dir = Path(out_dir).absolute()
    tmp = [None]
    if rank() == 0:
        refuse_non_empty(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = [make_temp_dir_beside(out_dir)]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp, src=0)
    step = Path(tmp[0]) / "checkpoints" / "step_0"
    if rank() == 0:
        step.mkdir(parents=True)
    barrier()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(step), no_dist=not dist.is_initialized())
    barrier()
    if rank() == 0:
        _describe_step0(Path(tmp[0]), dataclasses.replace(model_cfg, init_from=None), trainer_state)
        follow_umask(Path(tmp[0]))
        if out_dir.exists():
            out_dir.rmdir()
        Path(tmp[0]).rename(out_dir)
    barrier()
    return out_dir


def checkpoint_recipe(path: Path) -> dict:
    """The resolved recipe (raw YAML mapping) saved with a committed checkpoint folder."""
    return yaml.safe_load((path / "config.yaml").read_text()) or {}


def checkpoint_model_config(path: Path):
    """The model config stored in a committed checkpoint folder."""
    raw = checkpoint_recipe(path)
    model_raw = raw.get("model")
    if not isinstance(model_raw, dict) or "name" not in model_raw:
        raise CheckpointError(f"{path / 'config.yaml'}: has no model section")
    return model_config_from_dict(model_raw)


def load_model_checkpoint(path):
    """(model config, full fp32 state dict, tokenizer folder or None) of a checkpoint or run dir."""
    model = load_model(path)
    ckpt = resolve_checkpoint(path)
    return model.config, {k: v for k, v in model.state_dict().items()}, tokenizer_dir_of(ckpt)


def load_model(path, device: str = "cpu"):
    """A single-process model with the weights of a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    model_cfg = checkpoint_model_config(ckpt)
    model_cfg.init_from = None
    model = build_model(model_cfg, "meta")
    model.to_empty(device=device)
    model.init_buffers()
    load_model_weights(ckpt, model, "checkpoint")
    model.eval()
    return model
