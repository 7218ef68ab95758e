"""Hugging Face adapter of the qwen3_moe family: Qwen3MoeForCausalLM <-> keel. Pure mappings, no file I/O.

Attention, norms, embeddings and dense layers map as in model/hf.py. The MoE layers:
  router   keel `feed_forward.router.weight` [E, dim]    <-> HF `mlp.gate.weight`
  experts  keel `feed_forward.experts.w1|w3|w2` [E, ...] <-> transformers 5 in memory: fused
           `mlp.experts.gate_up_proj` [E, 2I, dim] (gate rows first) and `mlp.experts.down_proj`
           [E, dim, I]; on disk (the Hub's and vLLM's format, which transformers converts on load):
           per-expert `mlp.experts.{j}.gate_proj|up_proj|down_proj.weight`.
Import reads either layout; export writes the per-expert one. Qwen3-MoE routes by softmax over the
plain scores, with no shared experts and no selection bias: a keel model that uses any of those has
no Qwen3-MoE equivalent and is refused rather than exported wrongly.
"""
from __future__ import annotations

import json
import re
from typing import Optional

import torch

from keel.errors import CheckpointError
from keel.model.backbone import TransformerConfig
from keel.model.hf import NAME_MAP, check_tensors, config_from_hf, config_to_hf, name_rules, rename_tensors
from keel.model.moe import MoEConfig
from keel.model.registry import HFAdapter

ARCHITECTURE = "Qwen3MoeForCausalLM"
_RULES = name_rules(NAME_MAP + (("layers.{i}.feed_forward.router.weight", "model.layers.{i}.mlp.gate.weight"),))
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_KEEL_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3)")
_HF_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


# ------------------------------------------------------------------ configs
def hf_to_keel_config(c, src: str = "HF config") -> TransformerConfig:
    step, dense = int(getattr(c, "decoder_sparse_step", 1) or 1), set(getattr(c, "mlp_only_layers", None) or [])
    layers = [i for i in range(c.num_hidden_layers) if i not in dense and (i + 1) % step == 0]
    moe = MoEConfig(n_experts=c.num_experts, top_k=c.num_experts_per_tok, expert_dim=c.moe_intermediate_size,
                    layers=None if len(layers) == c.num_hidden_layers else layers, router="softmax",
                    norm_topk=bool(c.norm_topk_prob))
    return config_from_hf(c, ARCHITECTURE, "qwen3_moe", src, qk_norm=True, qkv_bias=False, moe=moe)


def keel_to_hf_config(cfg: TransformerConfig, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
    from transformers import Qwen3MoeConfig  # heavy: only when exporting
    moe = cfg.moe
    problems = [what for what, bad in (
        ("model.moe: none set (a dense model exports as llama/qwen3)", moe is None),
        ("model.qk_norm: false (Qwen3-MoE always has QK-norm)", not cfg.qk_norm),
        ("model.qkv_bias: true", cfg.qkv_bias),
        ("model.moe.router: sigmoid (Qwen3-MoE routes by softmax)", moe is not None and moe.router != "softmax"),
        ("model.moe.n_shared_experts > 0", moe is not None and moe.n_shared_experts > 0)) if bad]
    if problems:
        raise CheckpointError(f"model: has no {ARCHITECTURE} equivalent: {problems[0]}")
    dense = [i for i in range(cfg.n_layers) if not moe.is_moe_layer(i)]
    return config_to_hf(cfg, Qwen3MoeConfig, ARCHITECTURE, bos_id, eos_id, num_experts=moe.n_experts,
                        num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_dim or cfg.ffn_dim,
                        norm_topk_prob=moe.norm_topk, decoder_sparse_step=1, mlp_only_layers=dense,
                        router_aux_loss_coef=moe.aux_loss_coef)


def hf_config_dict(cfg: TransformerConfig, bos_id, eos_id, dtype: torch.dtype) -> dict:
    hf_config = keel_to_hf_config(cfg, bos_id, eos_id)
    hf_config.dtype = dtype
    config_json = json.loads(hf_config.to_json_string(use_diff=True))
    config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config_json


# ------------------------------------------------------------------ state dicts
def hf_to_keel_state_dict(hf_sd: dict, cfg: TransformerConfig, src: str = "HF state dict") -> dict:
    """Either HF expert layout -> keel's stacked [E, ...] weights, plus zero selection biases."""
    rest, experts, origin = {}, {}, {}
    per_expert: dict = {}
    for name, t in hf_sd.items():
        if m := _FUSED.fullmatch(name):
            layer, kind = m.groups()
            prefix = f"layers.{layer}.feed_forward.experts"
            if kind == "gate_up_proj":
                experts[f"{prefix}.w1"], experts[f"{prefix}.w3"] = t.chunk(2, dim=1)
                origin[f"{prefix}.w1"] = origin[f"{prefix}.w3"] = name
            else:
                experts[f"{prefix}.w2"], origin[f"{prefix}.w2"] = t, name
        elif m := _PER_EXPERT.fullmatch(name):
            layer, j, proj = m.groups()
            per_expert.setdefault((layer, proj), {})[int(j)] = t
        else:
            rest[name] = t
    keel_proj = {v: k for k, v in _HF_PROJ.items()}
    for (layer, proj), by_index in per_expert.items():
        key = f"layers.{layer}.feed_forward.experts.{keel_proj[proj]}"
        experts[key] = torch.stack([by_index[j] for j in sorted(by_index)])
        origin[key] = f"model.layers.{layer}.mlp.experts.*.{proj}.weight"
    if cfg.tie_embeddings:
        rest.pop("lm_head.weight", None)
    sd, names, unknown = rename_tensors(rest, to_keel=True, rules=_RULES)
    sd.update(experts)
    origin.update(names)
    for i in range(cfg.n_layers):
        if cfg.moe.is_moe_layer(i):
            sd[f"layers.{i}.feed_forward.expert_bias"] = torch.zeros(cfg.moe.n_experts)
    check_tensors(sd, cfg, src, origin, unknown, hf_names=True, rules=_RULES)
    return sd


def keel_to_hf_state_dict(sd: dict, cfg: TransformerConfig, src: str = "keel state dict") -> dict:
    """keel -> the Hub's per-expert layout. A trained selection bias has no HF place: refused."""
    check_tensors(sd, cfg, src, {}, [], hf_names=False, rules=_RULES)
    biased = [k for k, t in sd.items() if k.endswith("expert_bias") and bool(t.abs().max() > 0)]
    if biased:
        raise CheckpointError(f"{src}: {biased[0]} is non-zero (aux-loss-free balancing); {ARCHITECTURE} routes "
                              f"without a selection bias, so its outputs would differ: train with "
                              f"model.moe.bias_update_rate=0 to export to Hugging Face")
    plain = {k: t for k, t in sd.items() if not _KEEL_EXPERT.fullmatch(k) and not k.endswith("expert_bias")}
    out = rename_tensors(plain, to_keel=False, rules=_RULES)[0]
    for k, t in sd.items():
        if m := _KEEL_EXPERT.fullmatch(k):
            layer, w = m.groups()
            for j in range(t.shape[0]):
                out[f"model.layers.{layer}.mlp.experts.{j}.{_HF_PROJ[w]}.weight"] = t[j]
    return out


def hf_tensor_name(name: str) -> str:
    if _KEEL_EXPERT.fullmatch(name) or name.endswith("expert_bias"):
        raise CheckpointError(f"{name}: stacked experts have no single Hugging Face tensor; "
                              f"split it with hf_tensor_split, or convert the whole state dict (keel export hf)")
    renamed, _, unknown = rename_tensors({name: None}, to_keel=False, rules=_RULES)
    if unknown:
        raise CheckpointError(f"no Hugging Face name for tensor {name!r}")
    return next(iter(renamed))


def hf_tensor_split(name: str, tensor: torch.Tensor) -> list:
    """One keel tensor as its HF tensors: a stacked [E, ...] expert weight is E per-expert ones (views)."""
    if m := _KEEL_EXPERT.fullmatch(name):
        layer, w = m.groups()
        return [(f"model.layers.{layer}.mlp.experts.{j}.{_HF_PROJ[w]}.weight", tensor[j]) for j in range(tensor.shape[0])]
    return [(hf_tensor_name(name), tensor)]


QWEN3_MOE_HF_ADAPTER = HFAdapter(
    to_config=hf_config_dict,
    to_state_dict=lambda sd, cfg: keel_to_hf_state_dict(sd, cfg),
    tensor_name=hf_tensor_name,
    tensor_split=hf_tensor_split,
    architectures=(ARCHITECTURE,),
    from_config=hf_to_keel_config,
    from_state_dict=hf_to_keel_state_dict,
    model_types=(("qwen3_moe", ARCHITECTURE),),
)
