"""Reading DeepSpeed checkpoints and resharding between ZeRO layouts and keel's torch engine.

Used by keel/checkpoint/dcp.py (Checkpointer.load, load_model_weights) whenever a
checkpoint was written by `parallel.engine: deepspeed` (trainer.json: `"engine": "deepspeed"`) or
the model is a DeepSpeed engine. Weights are consolidated by DeepSpeed's own zero_to_fp32 and
ds_to_universal, and written into a ZeRO engine by deepspeed.utils.safe_set_full_*.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from keel.checkpoint.files import barrier, rank, resolve_checkpoint, set_rng_state, uses_deepspeed
from keel.errors import CheckpointError, MissingExtraError

DS_TAG = "deepspeed"  # engine.save_checkpoint's tag: DeepSpeed's files live in step_N/deepspeed/
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise MissingExtraError("parallel.engine: deepspeed is not installed; pip install 'keel[dev]' "
                                "(or pip install deepspeed)") from None
    return deepspeed


@contextlib.contextmanager
def _quiet(stderr: bool = True):  # DeepSpeed's config dump, conversion logs and progress bars
    with contextlib.redirect_stdout(io.StringIO()), \
            (contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext()):
        yield


def _fqn(name: str) -> str:
    """A parameter's name without activation checkpointing's wrapper, as keel's checkpoints store it."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _say(text: str) -> None:
    if rank() == 0:
        print(f"keel: {text}", flush=True)


def consolidated_state_dict(path: Path) -> dict:
    """The full fp32 weights of a DeepSpeed checkpoint folder, by DeepSpeed's own zero_to_fp32."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = json.loads((Path(path) / "trainer.json").read_text()).get("deepspeed_tag", DS_TAG)
    with _quiet():
        return {_fqn(k): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag).items()}


def load_consolidated_weights(path: Path, model) -> None:
    """load_model_weights for a DeepSpeed checkpoint (keel.load, `keel export hf`, model.init_from)."""

    try:
        set_model_state_dict(model, consolidated_state_dict(path),
                             options=StateDictOptions(full_state_dict=True, strict=True))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0][:200]})") from None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Checkpointer.load whenever DeepSpeed is on either side; returns trainer.json.

    The same ZeRO stage on the same world size loads with DeepSpeed's load_checkpoint. Anything else
    goes through full tensors per parameter (weights, exp_avg, exp_avg_sq; AdamW's step is the
    number of applied updates, the schedule's last_epoch): read from a DeepSpeed checkpoint by
    DeepSpeed's universal-checkpoint conversion or from a DCP checkpoint, then written into a
    ZeRO engine with deepspeed.utils.safe_set_full_* or into a torch model with set_*_state_dict.
    """
    path = resolve_checkpoint(path)
    state = json.loads((path / "trainer.json").read_text())
    from_ds, to_ds = uses_deepspeed(path), type(model).__name__ == "DeepSpeedEngine"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if from_ds and to_ds and (state.get("world_size"), state.get("zero_stage"), state.get("bf16")) == (
            world, model.zero_optimization_stage(), model.bfloat16_enabled()):
        with _quiet():
            loaded, _ = model.load_checkpoint(str(path), tag=state.get("deepspeed_tag", DS_TAG),
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load its checkpoint")
    else:
        names = [_fqn(n) for n, _ in (model.module if to_ds else model).named_parameters()]
        weights, adam = _universal_states(path, state) if from_ds else _dcp_states(path, names)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:3]})")
        step = int(state["scheduler"]["last_epoch"])
        with_adam = optimizer is not None and set(names) <= set(adam)
        (_set_engine_states if to_ds else _set_torch_states)(model, optimizer, weights, adam if with_adam else None, step)
        saved = f"ZeRO-{state.get('zero_stage')}" if from_ds else "torch"
        now = f"ZeRO-{model.zero_optimization_stage()}" if to_ds else "torch"
        _say(f"resharded {path} ({saved}, {state.get('world_size')} ranks) to {now} on {world} ranks: weights"
             + (" and AdamW state" if with_adam else "; WARNING: no AdamW state for every parameter, so the "
                "optimizer state starts afresh (data position, step and schedule are restored)"))
    opt = model.optimizer.optimizer if to_ds else optimizer  # the lr the schedule had reached
    for group, lr in zip(opt.param_groups if opt is not None else [], state["scheduler"]["_last_lr"]):
        group["lr"] = lr
    rng_file = path / "rng" / f"rank_{rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _universal_states(path: Path, state: dict):
    """Per-parameter full weights and AdamW moments of a DeepSpeed checkpoint, by DeepSpeed's
    universal checkpoint conversion (ds_to_universal), run on rank 0 into a scratch folder."""
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    scratch = path.parent / f".universal_{path.name}"
    if rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        with _quiet():
            ds_to_universal.main(Namespace(
                input_folder=str(path / state.get("deepspeed_tag", DS_TAG)), output_folder=str(scratch),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True))
    barrier()
    weights, adam = {}, {}
    for folder in sorted(f for f in (scratch / "zero").iterdir() if f.is_dir()):
        files = {k: torch.load(folder / f"{k}.pt", weights_only=False) for k in ("fp32", *ADAM_STATES)
                 if (folder / f"{k}.pt").is_file()}
        files = {k: v["param"] if isinstance(v, dict) else v for k, v in files.items()}
        weights[_fqn(folder.name)] = files.pop("fp32")
        if len(files) == len(ADAM_STATES):
            adam[_fqn(folder.name)] = files
    barrier()
    if rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    return weights, adam


def _dcp_states(path: Path, names: list[str]):
    """Full weights and AdamW moments of a keel (DCP) checkpoint, read whole on every rank."""

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = {(n, "param"): f"model.{n}" for n in names}
    keys.update({(n, k): f"optim.state.{n}.{k}" for n in names for k in ADAM_STATES})
    flat = {key: torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
            for key in keys.values() if key in meta}
    dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    weights = {n: flat[keys[n, "param"]] for n in names if keys[n, "param"] in flat}
    adam = {n: {k: flat[keys[n, k]] for k in ADAM_STATES} for n in names
            if all(keys[n, k] in flat for k in ADAM_STATES)}
    return weights, adam


def _set_torch_states(model, optimizer, weights: dict, adam, step: int) -> None:

    full = StateDictOptions(full_state_dict=True)
    shapes = {_fqn(n): p.shape for n, p in model.named_parameters()}
    set_model_state_dict(model, {n: weights[n].reshape(shapes[n]) for n in shapes},
                         options=StateDictOptions(full_state_dict=True, strict=True))
    if adam is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=full)
        osd["state"] = {n: {"step": torch.tensor(float(step)), **{k: adam[n][k].reshape(shapes[n]) for k in ADAM_STATES}}
                        for n in shapes}
        set_optimizer_state_dict(model, optimizer, osd, options=full)


def _set_engine_states(engine, optimizer, weights: dict, adam, step: int) -> None:
    deepspeed = import_deepspeed()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = [(_fqn(n), p) for n, p in engine.module.named_parameters()]
    for name, p in params:  # the working copy (gathered under ZeRO-3), then the fp32 master partition
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            p.data.copy_(weights[name].reshape(p.shape).to(p.dtype))
        safe_set_full_fp32_param(p, weights[name].float())
    if adam is None:
        return
    zero, base = engine.optimizer, engine.optimizer.optimizer
    # AdamW's state on the flat fp32 partitions it steps (ZeRO-3 keeps them outside param_groups), as
    # its first step would create it; then filled parameter by parameter.
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [f for g in base.param_groups for f in g["params"]]
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the fragments to the new state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in params:
        for key in ADAM_STATES:
            safe_set_full_optimizer_state(p, adam[name][key].float(), key)
