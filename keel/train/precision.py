"""Precision: bf16 autocast and FP8 training, applied to a built model from outside it.

`precision.fp8` picks a backend from FP8_BACKENDS:
  torchao  Float8Linear (tensorwise or rowwise scaling) on the blocks' linears; composes with
           FSDP2 (FP8 all-gather under tensorwise) and TP. Runs on CPU too (numerics only).
  te       Transformer Engine linears under te.fp8_autocast (delayed or current scaling); NVIDIA
           Hopper or newer only.
A missing package or an unsupported device is a clear error naming what is missing; keel never
falls back to bf16 silently.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from keel.errors import ConfigError, MissingExtraError

DEFAULT_RECIPE = {"torchao": "rowwise", "te": "delayed"}
RECIPES = {"torchao": ("tensorwise", "rowwise"), "te": ("delayed", "current")}


def fp8_recipe(cfg) -> str:
    recipe = cfg.fp8_recipe or DEFAULT_RECIPE[cfg.fp8]
    if recipe not in RECIPES[cfg.fp8]:
        raise ConfigError(f"precision.fp8_recipe: {recipe!r} is not a {cfg.fp8} recipe; "
                          f"expected one of {RECIPES[cfg.fp8]}")
    return recipe


def _fp8_linear_filter(min_features: int) -> Callable[[torch.nn.Module, str], bool]:
    """Linears of the blocks big enough for FP8 to pay (precision.fp8_min_features). FP8 matmuls
    need both dims divisible by 16; the LM head is not a module call in keel."""
    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")
                and module.in_features % 16 == 0 and module.out_features % 16 == 0
                and min(module.in_features, module.out_features) >= min_features)
    return keep


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence third-party loggers during an import: torchao warns for every CUDA-only .so it cannot
    load on this machine, and torch's pytree for an enum torchao registers; neither is the user's."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def convert_torchao(model: torch.nn.Module, cfg, fsdp: bool) -> None:
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional extra
    except ImportError:
        raise MissingExtraError("precision.fp8: torchao is not installed; pip install 'keel[gpu]' "
                                "(or torchao)") from None
    recipe = fp8_recipe(cfg)
    config = Float8LinearConfig.from_recipe_name(recipe)
    if uses_fp8_all_gather(cfg, fsdp):
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)  # all-gather weights in FP8
    convert_to_float8_training(model, config=config, module_filter_fn=_fp8_linear_filter(cfg.fp8_min_features))


def convert_te(model: torch.nn.Module, cfg, fsdp: bool) -> None:
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        raise MissingExtraError("precision.fp8: te needs Transformer Engine, which is not installed; "
                                "pip install 'keel[gpu]' (transformer-engine[pytorch])") from None
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise ConfigError("precision.fp8: te needs an NVIDIA Hopper (sm_90) or newer GPU; "
                          "use precision.fp8=torchao elsewhere")
    fp8_recipe(cfg)
    keep = _fp8_linear_filter(cfg.fp8_min_features)
    for fqn, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            path = f"{fqn}.{name}" if fqn else name
            if keep(child, path):
                swapped = te.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    params_dtype=child.weight.dtype, device=child.weight.device)
                with torch.no_grad():
                    swapped.weight.copy_(child.weight)
                    if child.bias is not None:
                        swapped.bias.copy_(child.bias)
                setattr(module, name, swapped)


FP8_BACKENDS: dict[str, Callable] = {"off": lambda model, cfg, fsdp: None,
                                     "torchao": convert_torchao, "te": convert_te}


def apply_fp8(model: torch.nn.Module, cfg, fsdp: bool) -> None:
    FP8_BACKENDS[cfg.fp8](model, cfg, fsdp)


def uses_fp8_all_gather(cfg, fsdp: bool) -> bool:
    return fsdp and cfg.fp8 == "torchao" and fp8_recipe(cfg) == "tensorwise"


def after_optimizer_step(model: torch.nn.Module, cfg, fsdp: bool) -> None:
    """With FP8 all-gather under FSDP, compute every weight's FP8 scale once for all ranks after the
    update (one all-reduce for the whole model), instead of one small all-reduce per weight in the
    next forward."""
    if uses_fp8_all_gather(cfg, fsdp):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp  # imported by convert_torchao
        precompute_float8_dynamic_scale_for_fsdp(model)


def forward_context(cfg, device: torch.device, autocast_bf16: bool):
    """The context every forward runs in: bf16 autocast and/or TE's fp8_autocast."""
    stack = contextlib.ExitStack()
    if autocast_bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if cfg.fp8 == "te":
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling

        recipe = DelayedScaling() if fp8_recipe(cfg) == "delayed" else Float8CurrentScaling()
        stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=recipe))
    return stack


def slow_bf16_warning(key: str, device: torch.device) -> str | None:
    """A one-line warning when bf16 is asked for on a CPU without native bf16 matmuls (no AVX512-BF16
    or AMX: oneDNN does not take bf16 there and torch falls back to a plain loop). Measured on an
    AVX2 AMD EPYC: a [512x576] x [576x1536] matmul takes 35 ms in fp32 and 990 ms in bf16."""
    if device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"keel: warning: {key} asks for bf16, but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
            f"native bf16 matmul: bf16 runs ~30x slower than fp32 here; fp32 is the faster choice on it")
