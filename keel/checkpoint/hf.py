"""Hugging Face folders in and out: the file side of every family's HF adapter.

Loading goes through transformers itself (safetensors, .bin or GGUF, de-quantised to fp32), then the
family whose adapter imports the architecture maps config and tensors to keel's. Saving writes what
`AutoModelForCausalLM.from_pretrained` and vLLM read — model.safetensors, config.json,
generation_config.json, the tokenizer files and the family's extra files (remote code) — into a
temporary folder beside the target, renamed into place once whole.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from keel.checkpoint.files import new_folder, refuse_non_empty
from keel.checkpoint.model_io import load_model_checkpoint, write_model_checkpoint
from keel.data.assets import asset_path
from keel.errors import CheckpointError
from keel.model.registry import (
    MODELS,
    HFAdapter,
    family_for_architecture,
    get_model_spec,
    hf_architecture,
    importable_architectures,
)

_WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Files of an HF model folder that are not the tokenizer's.
_NOT_TOKENIZER = re.compile(r"(config\.json|generation_config\.json|.*\.(safetensors|bin|gguf|pt|pth|index\.json))$")


# ------------------------------------------------------------------ load
def locate(src: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """(folder, gguf file name or None) for an import source."""
    if str(src) == "smollm2":
        return asset_path("smollm2"), None
    path = Path(src).expanduser()
    expected = "an HF model folder (config.json + model*.safetensors or pytorch_model*.bin), a .gguf file or `smollm2`"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected {expected}")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        raise CheckpointError(f"{path}: is a file but not a .gguf; expected {expected}")
    has_weights = any(f for pattern in _WEIGHT_FILES for f in path.glob(pattern))
    if (path / "config.json").is_file() and has_weights:
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise CheckpointError(f"{path}: holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass the one to import")
    if (path / "config.json").is_file():
        raise CheckpointError(f"{path}: has config.json but no weights; expected model*.safetensors or pytorch_model*.bin")
    raise CheckpointError(f"{path}: no config.json with weights and no .gguf file; expected {expected}")


def is_hf_folder(path: Union[str, Path]) -> bool:
    """An HF model folder (config.json + safetensors), as opposed to a keel run or checkpoint."""
    path = Path(path)
    return ((path / "config.json").is_file() and any(path.glob("*.safetensors"))
            and not (path / "checkpoints").exists() and not (path / ".metadata").exists())


def load_hf_weights_sharded(folder: Union[str, Path], model, key: str = "model.init_from") -> None:
    """Fill `model` (sharded or not) straight from an HF folder's safetensors: DCP's Hugging Face
    reader gives each rank only the slices its shards need, so no rank reads the whole model.

    The family's HF names must be plain renames of keel's (dense Llama / Qwen layouts); a layout that
    needs its tensors rearranged (stacked MoE experts, KSA's summary rows) is refused with the way
    round it: `keel import hf` once, then init_from the imported folder."""
    from transformers import AutoConfig  # heavy: only for an HF init_from

    folder = Path(folder).absolute()
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{key}: {folder}: cannot read its config: {_first_line(e)}") from None
    cfg = model.config
    adapter = import_adapter(hf_config, f"{key}: {folder}")
    convert = f"convert it once with `keel import hf {folder} OUT` and set {key}=OUT"
    reader = HuggingFaceStorageReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    state = get_model_state_dict(model)
    by_hf_name, hf_name_of, problems = {}, {}, []
    for name, tensor in state.items():
        try:
            hf_name = adapter.tensor_name(name)
        except CheckpointError:
            hf_name = None
        if hf_name not in stored:
            problems.append(f"{name} has no tensor there")
        elif tuple(stored[hf_name].size) != tuple(tensor.shape):
            problems.append(f"{hf_name} is {tuple(stored[hf_name].size)}, the recipe's model needs {tuple(tensor.shape)}")
        else:
            by_hf_name[hf_name], hf_name_of[name] = tensor, hf_name
    if problems:
        theirs = adapter.from_config(hf_config, str(folder)) if adapter.from_config else None
        differ = [f"{f.name} {getattr(theirs, f.name)} vs {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                  if theirs is not None and f.name != "init_from" and getattr(theirs, f.name) != getattr(cfg, f.name)]
        detail = f"model settings differ (HF vs recipe): {'; '.join(differ[:4])}" if differ else problems[0]
        raise CheckpointError(f"{key}: {folder} does not fit the recipe's {cfg.name} model shard by shard "
                              f"({detail}, {len(problems)} tensor(s)); if the layout is right, {convert}")
    dcp.load(by_hf_name, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, {name: by_hf_name[hf_name_of[name]] for name in state})


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def import_adapter(hf_config, where: str) -> HFAdapter:
    """The adapter that imports `hf_config`: one that claims it (a layout that reuses another family's
    architecture name), else the family registered for its architecture."""
    for spec in MODELS.values():
        for adapter in (spec.hf, *(a for _, a in spec.hf.formats)) if spec.hf else ():
            if adapter.claims is not None and adapter.claims(hf_config):
                return adapter
    arch = hf_architecture(hf_config)
    spec = family_for_architecture(arch)
    if spec is None:
        raise CheckpointError(f"{where}: architecture {arch} is not supported; keel imports "
                              f"{', '.join(importable_architectures())}")
    return spec.hf


def read_weight_files(folder: Path) -> dict:
    """The tensors of an HF folder's weight files as stored, floats as fp32."""
    from safetensors.torch import load_file  # heavy: only when importing
    sd = {}
    try:
        for f in sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin")):
            sd.update(load_file(f) if f.suffix == ".safetensors" else
                      torch.load(f, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read its weights: {_first_line(e)}") from None
    return {k: v.float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}


def load_hf(src: Union[str, Path]):
    """(keel config, keel-named fp32 state dict, transformers tokenizer or None) of an HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: only when importing
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keel prints its own one line per import
    folder, gguf = locate(src)
    where = str(folder / gguf) if gguf else str(folder)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        hf_config = AutoConfig.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: cannot read its config: {_first_line(e)}") from None
    adapter = import_adapter(hf_config, where)
    cfg = adapter.from_config(hf_config, where)
    if adapter.raw_weights:
        if gguf:
            raise CheckpointError(f"{where}: this layout imports from safetensors or .bin weights, not GGUF")
        hf_sd = read_weight_files(folder)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, config=hf_config, dtype=torch.float32, **extra)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{where}: cannot load its weights: {_first_line(e)}") from None
        hf_sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        del model
    sd = adapter.from_state_dict(hf_sd, cfg, where)
    tokenizer = None
    if gguf or any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    return cfg, sd, tokenizer


# ------------------------------------------------------------------ save
def tensors_for_file(hf_sd: dict) -> tuple[dict, torch.dtype]:
    """CPU, contiguous, one dtype (the weights' own, fp32 when mixed), no two sharing storage."""
    dtypes = {t.dtype for t in hf_sd.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    out, seen = {}, set()
    for name, t in hf_sd.items():
        t = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out, dtype


def write_hf_folder(out: Union[str, Path], tensors: dict, config_json: dict, tokenizer_dir: Optional[Path],
                    bos_id: Optional[int], eos_id: Optional[int], extra_files: tuple = ()) -> Path:
    """An HF model folder at `out`: safetensors, config.json, generation_config.json, the tokenizer
    files and `extra_files` (e.g. remote code), built beside `out` and renamed into place."""
    from safetensors.torch import save_file  # heavy: only when exporting
    from transformers import GenerationConfig
    out = Path(out).absolute()
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"{tokenizer_dir}: tokenizer folder does not exist")
    with new_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id).save_pretrained(tmp)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        if tokenizer_dir is not None:
            for f in sorted(Path(tokenizer_dir).iterdir()):
                if f.is_file() and not f.name.startswith(".") and not _NOT_TOKENIZER.fullmatch(f.name):
                    shutil.copy2(f, tmp / f.name)
    return out


def export_adapter(model_cfg, fmt: Optional[str] = None) -> HFAdapter:
    """The family's HF adapter, or its alternative layout `fmt` (None or "default": the adapter itself)."""
    spec = get_model_spec(model_cfg.name)
    if spec.hf is None:
        raise CheckpointError(f"model.name: the {spec.name} family has no Hugging Face export")
    if fmt in (None, "default"):
        return spec.hf
    formats = dict(spec.hf.formats)
    if fmt not in formats:
        raise CheckpointError(f"--format: the {spec.name} family has no {fmt!r} export; "
                              f"expected one of {['default', *formats]}")
    return formats[fmt]


def save_hf(model_cfg, state_dict: dict, out: Union[str, Path], tokenizer_dir: Optional[Path] = None,
            bos_id: Optional[int] = None, eos_id: Optional[int] = None, fmt: Optional[str] = None) -> Path:
    """Write the HF model folder of any family with an HF adapter at `out` (atomically), in its
    default layout or the alternative one named `fmt`."""
    adapter = export_adapter(model_cfg, fmt)
    tensors, dtype = tensors_for_file(adapter.to_state_dict(state_dict, model_cfg))
    config_json = adapter.to_config(model_cfg, bos_id, eos_id, dtype)
    return write_hf_folder(out, tensors, config_json, tokenizer_dir, bos_id, eos_id, adapter.extra_files)


# ------------------------------------------------------------------ keel checkpoints
def import_hf(src: Union[str, Path], out: Union[str, Path]) -> Path:
    """An HF model (folder, .gguf or `smollm2`) as a keel checkpoint folder holding only its weights."""
    refuse_non_empty(Path(out).absolute())  # before the (slow) load, and never over a user's folder
    cfg, sd, tokenizer = load_hf(src)
    path = write_model_checkpoint(Path(out), cfg, sd, tokenizer=tokenizer)
    n = sum(t.numel() for t in sd.values())
    print(f"keel import: {src} -> {path} ({cfg.name}, {n / 1e6:.1f}M params, {cfg.n_layers} layers)")
    return path


def export_hf(ckpt: Union[str, Path], out: Union[str, Path], fmt: Optional[str] = None) -> Path:
    """A keel checkpoint (or run dir) as an HF model folder for transformers / vLLM (layout `fmt`)."""
    from transformers import AutoTokenizer  # heavy: only when exporting
    refuse_non_empty(Path(out).absolute())
    cfg, sd, tokenizer_dir = load_model_checkpoint(ckpt)
    export_adapter(cfg, fmt)  # an unknown format fails before the tokenizer is read
    bos_id = eos_id = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        bos_id, eos_id = tok.bos_token_id, tok.eos_token_id
    path = save_hf(cfg, sd, Path(out), tokenizer_dir, bos_id=bos_id, eos_id=eos_id, fmt=fmt)
    arch = json.loads((path / "config.json").read_text()).get("architectures", ["?"])[0]
    print(f"keel export: {Path(ckpt).absolute()} -> {path} ({arch}, {sum(t.numel() for t in sd.values()) / 1e6:.1f}M params)")
    return path
