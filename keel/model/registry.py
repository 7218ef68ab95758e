"""Model families by name: `model.name` in a recipe picks a ModelSpec.

A family is one registration. Its ModelSpec carries everything the trainer, eval, CLI and
exporters need, so none of them ever branches on a family's name:
  config_cls + build   the single-device model (built on the meta device, materialised per shard)
  tp_plan + model_parallel   which linears split how under TP, and which of tp/cp/pp it supports
  task                 its training task: data, loss, eval metrics (keel/model/task.py)
  decode               text in, text out for `keel generate` and the end-of-run sample (or None)
  hf                   its Hugging Face adapter: pure config and tensor-name mappings (file I/O is
                       keel/checkpoint's job)
Built-in families register in their own modules, imported by keel/model/__init__.py; a user's
family registers the same way from any module a recipe lists under `plugins:`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from keel.config import build_dataclass, register_section
from keel.errors import ConfigError


@dataclass(frozen=True)
class TensorParallelPlan:
    """Megatron's split of a block, as module paths inside each block. Pure data: keel/train/
    parallel.py turns it into DTensor styles, and the model code never sees it."""
    colwise: tuple = ()  # output features split over tp ranks (q/k/v, gate/up)
    rowwise: tuple = ()  # input features split, outputs summed (o, down)
    sequence_norms: tuple = ()  # run on sequence shards under sequence parallelism
    head_norms: tuple = ()  # norms over head_dim applied to this rank's heads (QK-norm)
    gathered_inputs: tuple = ()  # (submodule, number of positional args): first arg gathered
    sequence_parallel: bool = True  # the blocks can run on sequence shards (parallel.sequence_parallel)


TRANSFORMER_TP_PLAN = TensorParallelPlan(
    colwise=("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
    rowwise=("attention.wo", "feed_forward.w2"),
    sequence_norms=("attention_norm", "ffn_norm"),
    head_norms=("attention.q_norm", "attention.k_norm"),
    gathered_inputs=(("attention", 5), ("feed_forward", 1)),
)


@dataclass(frozen=True)
class HFAdapter:
    """A family's mapping to and from Hugging Face, as pure functions (no file is read or written)."""
    to_config: Callable  # (cfg, bos_id, eos_id, dtype) -> config.json as a dict
    to_state_dict: Callable  # (keel state dict, cfg) -> HF-named state dict
    tensor_name: Callable  # keel tensor name -> HF name, for streaming weights one by one (vLLM sync)
    # (keel name, tensor) -> [(HF name, tensor), ...] where one keel tensor is several HF ones (stacked
    # experts); None: every tensor is one, named by tensor_name. See hf_named_tensors.
    tensor_split: Optional[Callable] = None
    architectures: tuple = ()  # transformers architectures this family imports (empty: export only)
    from_config: Optional[Callable] = None  # (transformers config, source name) -> family config
    from_state_dict: Optional[Callable] = None  # (HF state dict, cfg, source name) -> keel state dict
    extra_files: tuple = ()  # files copied into an export beside the weights (remote code)
    # (HF model_type, architecture) pairs, for configs without `architectures` (as GGUF files give)
    model_types: tuple = ()
    # Other layouts of the same family: (name, HFAdapter) pairs that `keel export hf --format NAME` writes.
    formats: tuple = ()
    # (transformers config) -> bool: this adapter imports the config although its architecture is another
    # family's (the official KSA layout is a Qwen3ForCausalLM config with summary fields). Checked first.
    claims: Optional[Callable] = None
    # Import reads the weight files as stored: transformers' class for the architecture would drop the
    # tensors it does not know (the claimed layout's extra ones).
    raw_weights: bool = False


@dataclass
class ModelSpec:
    name: str
    config_cls: type
    build: Callable  # config -> nn.Module (call under torch.device("meta") for large models)
    task: Callable  # Config -> TrainingTask (keel/model/task.py)
    description: str = ""
    tp_plan: TensorParallelPlan = TRANSFORMER_TP_PLAN  # applied to every module in model.layers
    # Model parallelisms the family supports besides data parallelism (DDP / FSDP2 / HSDP / ZeRO).
    model_parallel: tuple = ("tp", "cp", "pp")
    # (model, tokenizer folder or None, prompt, max_new_tokens, temperature, top_p, top_k, seed) -> text
    decode: Optional[Callable] = None
    hf: Optional[HFAdapter] = None


MODELS: dict[str, ModelSpec] = {}


def hf_named_tensors(adapter: HFAdapter, named):
    """A stream of keel (name, tensor) pairs as Hugging Face ones, lazily (vLLM weight sync)."""
    for name, tensor in named:
        if adapter.tensor_split is not None:
            yield from adapter.tensor_split(name, tensor)
        else:
            yield adapter.tensor_name(name), tensor


def register_model(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


def get_model_spec(name) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.name: unknown model family {name!r}{hint}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def hf_architecture(hf_config) -> str:
    """The architecture of a transformers config (from its model_type when it names none)."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    by_type = {t: a for s in MODELS.values() if s.hf for t, a in s.hf.model_types}
    return by_type.get(model_type, f"{model_type!r} (model_type)")


def family_for_architecture(architecture: str) -> Optional[ModelSpec]:
    """The family whose HF adapter imports `architecture`, or None."""
    return next((s for s in MODELS.values() if s.hf and architecture in s.hf.architectures), None)


def importable_architectures() -> list[str]:
    return [a for s in MODELS.values() if s.hf for a in s.hf.architectures]


def build_model(cfg, device: Optional[str] = None):
    """Build a family's model for `cfg` (its config dataclass), on `device` (e.g. "meta")."""
    spec = get_model_spec(cfg.name)
    with torch.device(device or "cpu"):
        return spec.build(cfg)


def model_config_from_dict(raw, key: str = "model"):
    """The family's config dataclass for a `model:` mapping (chosen by its `name`), validated."""
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{key}.name: required (a registered model family, e.g. 'llama')")
    cfg = build_dataclass(get_model_spec(raw["name"]).config_cls, raw, key)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


register_section("model", resolve=model_config_from_dict)
