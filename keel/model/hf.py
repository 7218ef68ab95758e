"""Hugging Face adapter of the LM families: LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM <-> keel.

Pure mappings, no file I/O (reading and writing HF folders is keel/checkpoint/hf.py): configs map
field by field; state dicts by the declarative NAME_MAP below (RoPE is HF's rotate-half layout in
both, so q/k need no permutation). `LLAMA_HF_ADAPTER` is what the llama and qwen3 families register.
"""
from __future__ import annotations

import json
import re
from typing import Optional

import torch

from keel.errors import CheckpointError, ConfigError
from keel.model.backbone import RopeScaling, Transformer, TransformerConfig
from keel.model.registry import HFAdapter

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM")
_FAMILY = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen3"}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# keel name <-> HF name; "{i}" is the layer index. Everything else must match exactly.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention.wq.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attention.wk.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attention.wv.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.attention.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attention.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_RULES = [(_pattern(k), _pattern(h), k, h) for k, h in NAME_MAP]


# ------------------------------------------------------------------ configs
def _architecture(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    return archs[0] if archs else _BY_MODEL_TYPE.get(model_type, f"{model_type!r} (model_type)")


def hf_to_keel_config(hf_config, src: str = "HF config") -> TransformerConfig:
    """A transformers config of a supported architecture as a keel TransformerConfig."""
    arch = _architecture(hf_config)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{src}: architecture {arch} is not supported; keel imports {', '.join(ARCHITECTURES)}")
    return config_from_hf(hf_config, arch, _FAMILY[arch], src, qk_norm=arch == "Qwen3ForCausalLM",
                          qkv_bias=arch == "Qwen2ForCausalLM")


def config_from_hf(c, arch: str, family: str, src: str, qk_norm: bool, qkv_bias: bool, **extra) -> TransformerConfig:
    """The fields every Llama-shaped HF config shares, checked; `extra` adds family fields (moe)."""
    for attr, ok in (("hidden_act", ("silu", "swish")), ("attention_bias", (False, None)),
                     ("mlp_bias", (False, None))):
        if getattr(c, attr, None) not in ok:
            raise CheckpointError(f"{src}: {arch} with {attr} = {getattr(c, attr, None)!r} is not supported by keel")
    if "sliding_attention" in (getattr(c, "layer_types", None) or ()):
        raise CheckpointError(f"{src}: {arch} with sliding-window attention layers is not supported by keel")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{src}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported; keel rotates the whole head")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = RopeScaling()
    elif rope_type == "linear":
        scaling = RopeScaling("linear", factor=float(rope["factor"]))
    elif rope_type == "llama3":
        scaling = RopeScaling("llama3", factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_seq_len=int(rope.get("original_max_position_embeddings")
                                                       or c.max_position_embeddings))
    else:
        raise CheckpointError(f"{src}: rope type {rope_type!r} is not supported; keel supports default, linear and llama3")
    cfg = TransformerConfig(
        name=family, vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        ffn_dim=c.intermediate_size, norm_eps=float(c.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0)), rope_scaling=scaling,
        qk_norm=qk_norm, qkv_bias=qkv_bias,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), max_seq_len=c.max_position_embeddings, **extra)
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return cfg


def keel_to_hf_config(cfg: TransformerConfig, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
    """The transformers config for `cfg`: Qwen3Config with qk_norm, Qwen2Config with qkv_bias, else LlamaConfig.
    (A keel `qwen3` model with neither is a Llama and exports as one.)"""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    if cfg.qk_norm and cfg.qkv_bias:
        raise CheckpointError("model: qk_norm together with qkv_bias has no Hugging Face architecture keel exports to")
    cls, arch = ((Qwen3Config, "Qwen3ForCausalLM") if cfg.qk_norm else
                 (Qwen2Config, "Qwen2ForCausalLM") if cfg.qkv_bias else (LlamaConfig, "LlamaForCausalLM"))
    return config_to_hf(cfg, cls, arch, bos_id, eos_id)


def config_to_hf(cfg: TransformerConfig, cls, arch: str, bos_id, eos_id, **extra):
    """An HF config of class `cls` from the fields every Llama-shaped config shares, plus `extra`."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    s = cfg.rope_scaling
    if s.type == "linear":
        rope.update(rope_type="linear", factor=float(s.factor))
    elif s.type == "llama3":
        rope.update(rope_type="llama3", factor=float(s.factor), low_freq_factor=float(s.low_freq_factor),
                    high_freq_factor=float(s.high_freq_factor), original_max_position_embeddings=s.original_max_seq_len)
    try:
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                   num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                   num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                   max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                   tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, attention_bias=False,
                   bos_token_id=bos_id, eos_token_id=eos_id, architectures=[arch], **extra)
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model: cannot be expressed as a {cls.__name__}: {msg}") from None


# ------------------------------------------------------------------ state dicts
def name_rules(name_map) -> list:
    return [(_pattern(k), _pattern(h), k, h) for k, h in name_map]


def _rename(sd: dict, to_keel: bool, rules=None) -> tuple[dict, dict, list]:
    """Renamed dict, {new name: old name}, and the old names no rule matches."""
    out, origin, unknown = {}, {}, []
    for name, tensor in sd.items():
        for keel_re, hf_re, keel_t, hf_t in rules or _RULES:
            m = (hf_re if to_keel else keel_re).fullmatch(name)
            if m:
                new = (keel_t if to_keel else hf_t).format(**m.groupdict())
                out[new], origin[new] = tensor, name
                break
        else:
            unknown.append(name)
    return out, origin, unknown


rename_tensors = _rename  # for other adapters built on these rules (model/hf_moe.py)


def _expected_shapes(cfg: TransformerConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def check_tensors(sd: dict, cfg: TransformerConfig, src: str, origin: dict, unknown: list, hf_names: bool,
                  rules=None) -> None:
    """Missing / unexpected / wrong-shape tensors as one error, named as the source names them."""
    want = _expected_shapes(cfg)

    def name(k: str) -> str:
        return origin.get(k) or (next(iter(_rename({k: None}, to_keel=False, rules=rules)[0]), k) if hf_names else k)

    def show(names: list) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [name(k) for k in want if k not in sd]
    extra = unknown + [name(k) for k in sd if k not in want]
    shapes = [f"{name(k)} {tuple(sd[k].shape)} (expected {want[k]})"
              for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    problems = [f"{len(names)} {what} ({show(names)})" for names, what in
                ((missing, "missing"), (extra, "unexpected"), (shapes, "with the wrong shape")) if names]
    if problems:
        raise CheckpointError(f"{src}: does not match a {cfg.n_layers}-layer {cfg.name} model "
                              f"(dim {cfg.dim}): tensors " + "; ".join(problems))


def hf_to_keel_state_dict(hf_sd: dict, cfg: TransformerConfig, src: str = "HF state dict") -> dict:
    """HF-named tensors -> keel-named tensors (the same tensors; `lm_head.weight` dropped when tied)."""
    hf_sd = dict(hf_sd)
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)
    sd, origin, unknown = _rename(hf_sd, to_keel=True)
    check_tensors(sd, cfg, src, origin, unknown, hf_names=True)
    return sd


def keel_to_hf_state_dict(sd: dict, cfg: TransformerConfig, src: str = "keel state dict") -> dict:
    """keel-named tensors -> HF-named tensors (no `lm_head.weight` when tied: HF ties it itself)."""
    check_tensors(sd, cfg, src, {}, [], hf_names=False)
    return _rename(sd, to_keel=False)[0]


def hf_tensor_name(name: str) -> str:
    renamed, _, unknown = _rename({name: None}, to_keel=False)
    if unknown:
        raise CheckpointError(f"no Hugging Face name for tensor {name!r}")
    return next(iter(renamed))


def hf_config_dict(cfg: TransformerConfig, bos_id: Optional[int], eos_id: Optional[int], dtype: torch.dtype) -> dict:
    """config.json of the export, as `save_pretrained` writes it."""
    hf_config = keel_to_hf_config(cfg, bos_id, eos_id)
    hf_config.dtype = dtype
    config_json = json.loads(hf_config.to_json_string(use_diff=True))
    # transformers 5 writes `dtype`; older readers (and some vLLM versions) look for `torch_dtype`.
    config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config_json


LLAMA_HF_ADAPTER = HFAdapter(
    to_config=hf_config_dict,
    to_state_dict=lambda sd, cfg: keel_to_hf_state_dict(sd, cfg),
    tensor_name=hf_tensor_name,
    architectures=ARCHITECTURES,
    from_config=hf_to_keel_config,
    from_state_dict=hf_to_keel_state_dict,
    model_types=tuple(_BY_MODEL_TYPE.items()),
)
