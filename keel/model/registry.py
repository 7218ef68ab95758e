"""Model families by name: `model.name` in a recipe picks a ModelSpec.

A ModelSpec says how to build the family's single-device model from its config dataclass; later
issues add the parallel plan and HF adapter beside it. Families register themselves on import.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Optional

from keel.errors import ConfigError
from keel.model.backbone import Transformer, TransformerConfig


@dataclass(frozen=True)
class TensorParallelPlan:
    """Megatron's split of a block, as module paths inside each block. Pure data: keel/train/
    parallel.py turns it into DTensor styles, and the model code never sees it."""
    colwise: tuple = ()  # output features split over tp ranks (q/k/v, gate/up)
    rowwise: tuple = ()  # input features split, outputs summed (o, down)
    sequence_norms: tuple = ()  # run on sequence shards under sequence parallelism
    head_norms: tuple = ()  # norms over head_dim applied to this rank's heads (QK-norm)
    gathered_inputs: tuple = ()  # (submodule, number of positional args): first arg gathered


TRANSFORMER_TP_PLAN = TensorParallelPlan(
    colwise=("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
    rowwise=("attention.wo", "feed_forward.w2"),
    sequence_norms=("attention_norm", "ffn_norm"),
    head_norms=("attention.q_norm", "attention.k_norm"),
    gathered_inputs=(("attention", 5), ("feed_forward", 1)),
)


@dataclass
class ModelSpec:
    name: str
    config_cls: type
    build: Callable  # config -> nn.Module (call under torch.device("meta") for large models)
    hf_architectures: tuple = ()  # transformers architectures this family imports / exports
    description: str = ""
    tp_plan: TensorParallelPlan = TRANSFORMER_TP_PLAN  # applied to every module in model.layers
    # Model parallelisms the family supports besides data parallelism (DDP / FSDP2 / HSDP / ZeRO).
    model_parallel: tuple = ("tp", "cp", "pp")


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


def get_model_spec(name) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.name: unknown model family {name!r}{hint}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(cfg, device: Optional[str] = None):
    """Build a family's model for `cfg` (its config dataclass), on `device` (e.g. "meta")."""
    import torch
    spec = get_model_spec(cfg.name)
    with torch.device(device or "cpu"):
        return spec.build(cfg)


register_model(ModelSpec("llama", TransformerConfig, Transformer, ("LlamaForCausalLM",),
                         "Llama-shaped decoder (SmolLM2, Llama 2/3)"))
register_model(ModelSpec("qwen3", TransformerConfig, Transformer, ("Qwen3ForCausalLM", "Qwen2ForCausalLM"),
                         "Qwen3-shaped decoder (QK-norm)"))

from keel.model.ksa import KSAConfig, KSATransformer  # noqa: E402  (after the base families)

# KSA's summary projections need their own TP styles, its expanded sequence its own CP split and
# PP stages: data parallelism only for now (refused with a clear error otherwise).
register_model(ModelSpec("ksa", KSAConfig, KSATransformer, (),
                         "Kwai Summary Attention: summary tokens every N text tokens (PAPERS.md §1)",
                         model_parallel=()))
