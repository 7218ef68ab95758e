"""`keel export fp8 RUN OUT`: a serving copy of a trained model with FP8 (E4M3) block weights
(keel/checkpoint/fp8_serving.py), and `load_fp8(OUT)` to run it.

OUT holds model.safetensors (E4M3 weights, fp32 scales, everything else as trained) and config.yaml
(the model config plus the quantisation settings). It is written beside and renamed into place, so it
appears whole or not at all; an existing non-empty OUT is refused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from keel.checkpoint.files import new_folder
from keel.checkpoint.model_io import load_model
from keel.errors import CheckpointError
from keel.checkpoint.fp8_serving import quantize_for_serving
from keel.model.registry import build_model, model_config_from_dict

FORMAT = "keel-fp8-e4m3-per-channel"


def export_fp8(checkpoint, out, min_features: int = 0) -> tuple[Path, list[str]]:
    from safetensors.torch import save_file  # only where HF-style files are written

    model = load_model(checkpoint)
    names = quantize_for_serving(model, min_features)
    if not names:
        raise CheckpointError(f"{checkpoint}: no block linear has >= {min_features} features to quantise "
                              f"(lower --min-features)")
    with new_folder(out) as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        config = {"model": dataclasses.asdict(model.config),
                  "quantization": {"format": FORMAT, "min_features": min_features, "modules": names}}
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(out).absolute(), names


def load_fp8(folder, device: str = "cpu"):
    """The FP8 serving model written by export_fp8, in eval mode without gradients."""
    from safetensors.torch import load_file  # only where HF-style files are read

    folder = Path(folder)
    config_path = folder / "config.yaml"
    if not config_path.is_file() or not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: not an FP8 export (expected config.yaml and model.safetensors "
                              f"from `keel export fp8`)")
    raw = yaml.safe_load(config_path.read_text()) or {}
    quant = raw.get("quantization") or {}
    if quant.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: quantization.format is {quant.get('format')!r}, expected {FORMAT!r}")
    cfg = model_config_from_dict(raw["model"])
    model = build_model(cfg, "meta")
    quantize_for_serving(model, quant.get("min_features", 0))  # the same structure, on meta
    model.to_empty(device=device)
    model.init_buffers()
    state = load_file(str(folder / "model.safetensors"), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'model.safetensors'}: does not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)
