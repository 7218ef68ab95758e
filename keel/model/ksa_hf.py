"""Hugging Face adapter of the KSA family: export as a transformers remote-code model folder.

Pure mappings (keel/checkpoint/hf.py writes the folder through the family's registered adapter). The folder holds
model.safetensors, config.json (architectures ["KSAForCausalLM"], auto_map to the remote code),
generation_config.json, the tokenizer files and keel/model/ksa_remote/modeling_ksa.py, so

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

loads it with transformers alone. Tensor names follow Llama/Qwen3's (model.layers.{i}.self_attn.q_proj
...); summary parameters add `_summary` to their module as the reference does (q_proj_summary,
model.summary_embedding, and the optional private copies input_layernorm_summary, mlp_summary, ...).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from keel.errors import CheckpointError
from keel.model.registry import HFAdapter

REMOTE_DIR = Path(__file__).resolve().parent / "ksa_remote"
REMOTE_FILES = ("modeling_ksa.py",)
ARCHITECTURE = "KSAForCausalLM"
AUTO_MAP = {"AutoConfig": "modeling_ksa.KSAConfig", "AutoModelForCausalLM": "modeling_ksa.KSAForCausalLM"}

# keel module path -> HF module path; `(_summary)?` carries over, so each rule covers the private copy.
_LAYER_MODULES = (
    (r"attention\.wq", "self_attn.q_proj"), (r"attention\.wk", "self_attn.k_proj"),
    (r"attention\.wv", "self_attn.v_proj"), (r"attention\.wo", "self_attn.o_proj"),
    (r"attention\.q_norm", "self_attn.q_norm"), (r"attention\.k_norm", "self_attn.k_norm"),
    (r"attention_norm", "input_layernorm"), (r"ffn_norm", "post_attention_layernorm"),
)
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight",
        "summary_embedding.weight": "model.summary_embedding.weight",
        "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """The export's tensor name for a keel KSA state-dict key."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        layer, module, kind = m.groups()
        for keel_mod, hf_mod in _LAYER_MODULES:
            sm = re.fullmatch(keel_mod + r"(_summary)?", module)
            if sm:
                return f"model.layers.{layer}.{hf_mod}{sm.group(1) or ''}.{kind}"
        sm = re.fullmatch(r"feed_forward(_summary)?\.(w[123])", module)
        if sm:
            return f"model.layers.{layer}.mlp{sm.group(1) or ''}.{_MLP[sm.group(2)]}.{kind}"
    raise CheckpointError(f"KSA export: no Hugging Face name for tensor {name!r}")


def hf_config_dict(cfg, bos_id: Optional[int], eos_id: Optional[int], dtype: torch.dtype) -> dict:
    """config.json of the export, for a KSAConfig `cfg`."""
    s = cfg.rope_scaling
    rope = {"type": s.type, "theta": float(cfg.rope_theta), "factor": float(s.factor),
            "low_freq_factor": float(s.low_freq_factor), "high_freq_factor": float(s.high_freq_factor),
            "original_max_seq_len": int(s.original_max_seq_len)}
    return {
        "architectures": [ARCHITECTURE], "auto_map": AUTO_MAP, "model_type": "keel_ksa",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "qk_norm": cfg.qk_norm, "attention_bias": cfg.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings, "ksa_rope": rope,
        "chunk_size": cfg.chunk_size, "summary_tokens": cfg.summary_tokens, "skip_old_summary": cfg.skip_old_summary,
        "ksa_layer_kinds": [cfg.layer_kind(i) for i in range(cfg.n_layers)],
        "ksa_layer_windows": [cfg.layer_window(i) for i in range(cfg.n_layers)],
        "summary_private": list(cfg.summary_private), "bos_token_id": bos_id, "eos_token_id": eos_id,
        # summary_mix_qkv: an export is taken as after the schedule (mix 0: summaries use the base q/k/v).
        "summary_mix_coeff": 0.0 if cfg.summary_mix_qkv else 1.0,
        # transformers 5 reads `dtype`, older readers (and some vLLM versions) `torch_dtype`.
        "use_cache": False, "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(state_dict: dict, cfg) -> dict:
    """The export's tensors, HF-named (no lm_head when tied: the remote code ties it itself)."""
    return {hf_name(k): v for k, v in state_dict.items() if not (cfg.tie_embeddings and k == "output.weight")}


KSA_HF_ADAPTER = HFAdapter(to_config=hf_config_dict, to_state_dict=hf_state_dict, tensor_name=hf_name,
                           extra_files=tuple(REMOTE_DIR / name for name in REMOTE_FILES))
