"""Hugging Face adapters of the KSA family: a transformers remote-code folder (the default export), and
the official KSA layout (`--format official`; imported by `keel import hf`), below.

Pure mappings (keel/checkpoint/hf.py writes the folder through the family's registered adapter). The folder holds
model.safetensors, config.json (architectures ["KSAForCausalLM"], auto_map to the remote code),
generation_config.json, the tokenizer files and keel/model/ksa_remote/modeling_ksa.py, so

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

loads it with transformers alone. Tensor names follow Llama/Qwen3's (model.layers.{i}.self_attn.q_proj
...); summary parameters add `_summary` to their module as the reference does (q_proj_summary,
model.summary_embedding, and the optional private copies input_layernorm_summary, mlp_summary, ...).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

import torch

from keel.errors import CheckpointError
from keel.model.hf import hf_config_dict as lm_hf_config_dict
from keel.model.hf import hf_to_keel_config
from keel.model.ksa_config import KSAConfig
from keel.model.registry import HFAdapter, build_model, hf_architecture

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




# ------------------------------------------------------------------ the official layout
# What the official converter writes (Kuaishou-OneRec/KSA @ 623c531: examples/pretrain/convert/checkpoint.py
# `remap_muse_to_hf`, read by examples/pretrain/hf_template/modeling_qwen3sa.py + config.json): a
# Qwen3ForCausalLM folder whose config adds summary_* fields. The S summary embedding rows are appended
# to model.embed_tokens (ids summary_token_begin ..), lm_head gets S zero rows to match, and
# config.vocab_size counts both. Layer tensor names are the ones above (q_proj_summary, input_layernorm_summary).
OFFICIAL_ARCHITECTURE = "Qwen3ForCausalLM"
OFFICIAL_AUTO_MAP = {"AutoModel": "modeling_qwen3sa.Qwen3Model",
                     "AutoModelForCausalLM": "modeling_qwen3sa.Qwen3ForCausalLM"}
# modeling_qwen3sa.py's only private summary module besides q/k/v (summary_independent_attention_layernorm).
OFFICIAL_PRIVATE = ("attention_norm",)
# Values of the official config keel reproduces; any other is refused by name.
_OFFICIAL_FIXED = {"summary_chunk_position_ids_type": "origin",
                   "summary_token_position_ids_type": "last_chunk_slice_right", "hidden_act": "silu"}
BACKSLASH_DOT = "\\."  # _LAYER_MODULES' keel side is a regex
_QWEN_VOCAB = 151936  # modeling_qwen3sa.py's default for truncate_predict_nums


def _keel_name(hf: str) -> Optional[str]:
    """The keel name of an official layer/norm tensor (the inverse of hf_name), or None."""
    if hf == "model.norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if not m:
        return None
    layer, module, kind = m.groups()
    for keel_mod, hf_mod in _LAYER_MODULES:
        sm = re.fullmatch(re.escape(hf_mod) + r"(_summary)?", module)
        if sm:
            return f"layers.{layer}.{keel_mod.replace(BACKSLASH_DOT, '.')}{sm.group(1) or ''}.{kind}"
    sm = re.fullmatch(r"mlp(_summary)?\.(gate_proj|up_proj|down_proj)", module)
    if sm:
        w = {v: k for k, v in _MLP.items()}[sm.group(2)]
        return f"layers.{layer}.feed_forward{sm.group(1) or ''}.{w}.{kind}"
    return None


def _eval_pattern(node):
    """An int, or a list built from int lists with + and * (no names, calls or other operators)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        return [_eval_pattern(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        a, b = _eval_pattern(node.left), _eval_pattern(node.right)
        if isinstance(node.op, ast.Mult) and max(a if isinstance(a, int) else 0, b if isinstance(b, int) else 0) > 1 << 20:
            raise ValueError("repeat count too large")
        return a + b if isinstance(node.op, ast.Add) else a * b
    raise ValueError(f"unsupported element {type(node).__name__}")


def parse_layer_pattern(value, n_layers: int, src: str, key: str) -> list[int]:
    """A per-layer int list from an official pattern field: an int (every layer), a list, or the
    Python expression the official code eval()s, e.g. "([128]*3+[1024]*1)*6" (parsed, never eval'd)."""
    try:
        if isinstance(value, str):
            value = _eval_pattern(ast.parse(value, mode="eval").body)
        values = [value] * n_layers if isinstance(value, int) else list(value)
        if not all(type(v) is int and v >= 0 for v in values):
            raise ValueError("expected non-negative ints")
    except (SyntaxError, ValueError, TypeError) as e:
        raise CheckpointError(f"{src}: {key} = {value!r} is not an int, list or [..]*n pattern ({e})") from None
    if len(values) < n_layers:  # the official code indexes it by layer
        raise CheckpointError(f"{src}: {key} gives {len(values)} values for {n_layers} layers")
    return values[:n_layers]


def _official_fields(c, src: str) -> dict:
    """The summary fields of an official config, checked: each one keel cannot represent is refused by name."""
    def need(key):
        if getattr(c, key, None) is None:
            raise CheckpointError(f"{src}: {key} missing from the official KSA config")
        return getattr(c, key)

    for key, want in _OFFICIAL_FIXED.items():
        got = getattr(c, key, want)  # absent: the released template's value
        if got != want:
            raise CheckpointError(f"{src}: {key} = {got!r} is not supported; keel implements {want!r}")
    n = c.num_hidden_layers
    if any(f != 1 for f in parse_layer_pattern(getattr(c, "summary_layer_freq", None) or 1, n, src,
                                                "summary_layer_freq")):
        raise CheckpointError(f"{src}: summary_layer_freq with 0 (full) layers is not supported: "
                              "modeling_qwen3sa.py refuses them with use_summary_attention")
    if getattr(c, "summary_independent_qk_norm", False):
        raise CheckpointError(f"{src}: summary_independent_qk_norm is not supported (modeling_qwen3sa.py has no such norms)")
    mix = float(getattr(c, "mix_coeff", 1.0))
    if not getattr(c, "summary_independent_parameters", False):
        mix = 0.0  # summaries use the base q/k/v, as at mix_coeff 0
    if mix not in (0.0, 1.0):
        raise CheckpointError(f"{src}: mix_coeff = {mix} is not supported; keel's summary_mix_qkv is a "
                              "training schedule, so only 1 (summary q/k/v) and 0 (base q/k/v) import")
    fields = {k: int(need(k)) for k in ("summary_chunk_size", "summary_token_num", "summary_token_begin")}
    begin, s = fields["summary_token_begin"], fields["summary_token_num"]
    if c.vocab_size != begin + s:
        raise CheckpointError(f"{src}: vocab_size {c.vocab_size} != summary_token_begin + summary_token_num = "
                              f"{begin + s} (the summary rows are appended to embed_tokens)")
    scored = int(getattr(c, "truncate_predict_nums", _QWEN_VOCAB))
    if 0 < scored < begin:
        raise CheckpointError(f"{src}: truncate_predict_nums = {scored} < summary_token_begin = {begin}: "
                              "keel's LM head scores every text id")
    windows = parse_layer_pattern(need("summary_sliding_chunk_num"), n, src, "summary_sliding_chunk_num")
    return {**fields, "windows": windows, "mix": mix,
            "private_norm": bool(getattr(c, "summary_independent_attention_layernorm", False))}


def official_claims(hf_config) -> bool:
    """An official KSA folder names Qwen3ForCausalLM; its summary fields tell it from a plain Qwen3."""
    return getattr(hf_config, "use_summary_attention", False) is True


def official_to_keel_config(hf_config, src: str = "official KSA config"):
    """A KSAConfig for an official config (the Qwen3 fields through the LM adapter, then the summary ones)."""
    arch = hf_architecture(hf_config)
    if arch != OFFICIAL_ARCHITECTURE:
        raise CheckpointError(f"{src}: architecture {arch} with use_summary_attention is not supported; "
                              f"the official KSA layout is {OFFICIAL_ARCHITECTURE}")
    f = _official_fields(hf_config, src)
    base = hf_to_keel_config(hf_config, src)  # checks activation, biases, sliding layers, RoPE
    windows = f["windows"]
    cfg = KSAConfig(**{**vars(base), "name": "ksa", "vocab_size": f["summary_token_begin"]},
                  chunk_size=f["summary_chunk_size"], summary_tokens=f["summary_token_num"],
                  window_chunks=min(windows), layer_pattern=["ksa"], layer_windows=windows,
                  summary_private=list(OFFICIAL_PRIVATE) if f["private_norm"] else [],
                  # mix 0 = summary_mix_qkv's schedule finished at step 1 (official_to_keel_state_dict
                  # then gives the summary q/k/v the base weights, so eval and training agree).
                  summary_mix_qkv=f["mix"] == 0.0,
                  # modeling_qwen3sa.py's Qwen3RingBufferCache decodes larger-window layers over all past text.
                  decode_large_window_as_full=True)
    cfg.validate()
    return cfg


def official_to_keel_state_dict(hf_sd: dict, cfg, src: str = "official KSA state dict") -> dict:
    """Official tensors -> keel's: embed_tokens split into text and summary rows, lm_head's padding dropped."""
    v, s = cfg.vocab_size, cfg.summary_tokens
    hf_sd = dict(hf_sd)
    sd, origin, unknown = {}, {}, []
    embed = hf_sd.pop("model.embed_tokens.weight", None)
    if embed is not None:
        if embed.shape[0] != v + s:
            raise CheckpointError(f"{src}: model.embed_tokens.weight has {embed.shape[0]} rows, expected "
                                  f"summary_token_begin + summary_token_num = {v + s}")
        sd["tok_embeddings.weight"], sd["summary_embedding.weight"] = embed[:v], embed[v:]
        origin["tok_embeddings.weight"] = origin["summary_embedding.weight"] = "model.embed_tokens.weight"
    head = hf_sd.pop("lm_head.weight", None)
    if head is not None and not cfg.tie_embeddings:
        sd["output.weight"], origin["output.weight"] = head[:v], "lm_head.weight"  # rows >= v: summary ids
    base_qkv = cfg.summary_mix_qkv  # official_to_keel_config sets it for mix_coeff 0 only: base q/k/v
    for name, t in hf_sd.items():
        k = _keel_name(name)
        if k is None:
            unknown.append(name)
        elif not (base_qkv and re.search(r"\.w[qkv]_summary\.", k)):  # dead at mix 0: replaced below
            sd[k], origin[k] = t, name
    want = {k: tuple(t.shape) for k, t in build_model(cfg, "meta").state_dict().items()}
    if base_qkv:
        for k in want:
            m = re.fullmatch(r"(.+\.w[qkv])_summary\.(weight|bias)", k)
            if m and f"{m.group(1)}.{m.group(2)}" in sd:
                sd[k] = sd[f"{m.group(1)}.{m.group(2)}"].clone()
    if cfg.tie_embeddings:
        want.pop("output.weight", None)
    missing = [k if k == "summary_embedding.weight" else hf_name(k) for k in want if k not in sd]
    extra = unknown + [origin[k] for k in sd if k not in want]
    shapes = [f"{origin.get(k, k)} {tuple(sd[k].shape)} (expected {want[k]})"
              for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    problems = [f"{len(x)} {what} ({', '.join(x[:3])})" for x, what in
                ((missing, "missing"), (extra, "unexpected"), (shapes, "with the wrong shape")) if x]
    if problems:
        raise CheckpointError(f"{src}: does not match a {cfg.n_layers}-layer KSA model: tensors " + "; ".join(problems))
    return sd


def check_official_representable(cfg) -> None:
    """Refuse, by key, a keel KSA model the official layout (modeling_qwen3sa.py) cannot express."""
    if not cfg.qk_norm:
        raise CheckpointError("model.qk_norm: false has no official KSA layout (Qwen3: q/k norms in every layer)")
    if any(cfg.layer_kind(i) != "ksa" for i in range(cfg.n_layers)):
        raise CheckpointError("model.layer_pattern: full layers have no official KSA layout (modeling_qwen3sa.py "
                              "has summary-attention layers only); use layer_windows (hybrid form 2)")
    if cfg.skip_old_summary:
        raise CheckpointError("model.skip_old_summary: true has no official KSA layout (its kernel always sees old summaries)")
    bad = [m for m in cfg.summary_private if m not in OFFICIAL_PRIVATE]
    if bad:
        raise CheckpointError(f"model.summary_private: {bad} have no official KSA layout; it allows only {list(OFFICIAL_PRIVATE)}")


def official_config_dict(cfg, bos_id: Optional[int], eos_id: Optional[int], dtype: torch.dtype) -> dict:
    """config.json in the official layout: the Qwen3 fields (the LM adapter's) plus the summary ones."""
    check_official_representable(cfg)
    config = lm_hf_config_dict(cfg, bos_id, eos_id, dtype)
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    config.update({
        "vocab_size": cfg.vocab_size + cfg.summary_tokens, "auto_map": OFFICIAL_AUTO_MAP,
        "use_summary_attention": True, "summary_token_begin": cfg.vocab_size,
        "summary_chunk_size": cfg.chunk_size, "summary_token_num": cfg.summary_tokens,
        "summary_sliding_chunk_num": windows[0] if len(set(windows)) == 1 else windows,
        **{k: v for k, v in _OFFICIAL_FIXED.items() if k != "hidden_act"},
        "summary_independent_parameters": True, "summary_attention_mode": "kernel",
        "summary_independent_attention_layernorm": "attention_norm" in cfg.summary_private,
        # as the remote-code export: a summary_mix_qkv model is taken as after its schedule (base q/k/v)
        "mix_coeff": 0.0 if cfg.summary_mix_qkv else 1.0,
        # the official model scores the first truncate_predict_nums ids (default: Qwen's 151936)
        "truncate_predict_nums": cfg.vocab_size,
    })
    return config


def official_state_dict(state_dict: dict, cfg) -> dict:
    """keel tensors in the official layout (summary rows appended to embed_tokens, lm_head zero-padded)."""
    check_official_representable(cfg)
    out = {}
    for k, t in state_dict.items():
        if k == "summary_embedding.weight":
            continue
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = torch.cat([t, state_dict["summary_embedding.weight"].to(t.dtype)])
        elif k == "output.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = torch.cat([t, t.new_zeros(cfg.summary_tokens, t.shape[1])])
        else:
            out[hf_name(k)] = t
    return out


def official_tensor_name(name: str) -> str:
    if name in ("tok_embeddings.weight", "summary_embedding.weight", "output.weight"):
        raise CheckpointError(f"official KSA layout: {name!r} is stored merged with the summary rows, not by name")
    return hf_name(name)


KSA_OFFICIAL_HF_ADAPTER = HFAdapter(to_config=official_config_dict, to_state_dict=official_state_dict,
                                    tensor_name=official_tensor_name, from_config=official_to_keel_config,
                                    from_state_dict=official_to_keel_state_dict, claims=official_claims,
                                    raw_weights=True)


# The default export is the remote-code folder; `keel export hf --format official` writes the official layout,
# and `keel import hf` takes an official folder by its config (official_claims).
KSA_HF_ADAPTER = HFAdapter(to_config=hf_config_dict, to_state_dict=hf_state_dict, tensor_name=hf_name,
                           extra_files=tuple(REMOTE_DIR / name for name in REMOTE_FILES),
                           formats=(("official", KSA_OFFICIAL_HF_ADAPTER),))
