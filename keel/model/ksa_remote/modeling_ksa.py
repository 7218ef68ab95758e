"""KSA (Kwai Summary Attention) for Hugging Face transformers, loaded with trust_remote_code=True.

Written into an export by keel (`keel export hf` on a KSA checkpoint); self-contained: imports only
torch and transformers. It computes what keel.model.ksa.KSATransformer computes:

  * S summary tokens (own embedding table) after every N text tokens; a trailing partial chunk gets
    none. Summary s of chunk i takes the RoPE position i*N + (s+1)*N//S - 1 (S = 1: the chunk's last
    text token); text keeps its own.
  * KSA layers attend with the mask of arXiv 2604.24432 (keel.model.ksa.summary_attention_mask):
    a summary query sees its own chunk causally; a text query sees text of its own chunk (causally)
    and of the W previous chunks, and the summaries of chunks older than that. Summary positions use
    their own q/k/v projections (and any private norm / o-proj / MLP copies listed in
    `summary_private`). "full" layers run plain causal attention over the text only; summaries pass
    through them unchanged.
  * Summary positions are dropped before the final norm and LM head: logits are for text only.

The mask is built densely (O(L^2)); this class is for evaluation and checking, not long-context
serving. There is no KV cache: generate() recomputes the whole sequence each step. Padding
(an attention_mask with zeros) is refused, because it would shift the chunk grid.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class KSAConfig(PretrainedConfig):
    model_type = "keel_ksa"

    def __init__(self, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, qk_norm=False, attention_bias=False, tie_word_embeddings=True,
                 ksa_rope=None, chunk_size=8, summary_tokens=1, ksa_layer_kinds=None, ksa_layer_windows=None,
                 skip_old_summary=False, summary_private=None, initializer_range=0.02, summary_mix_coeff=1.0,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim, self.rms_norm_eps = num_key_value_heads, head_dim, rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.qk_norm, self.attention_bias = qk_norm, attention_bias
        # RoPE under its own key: transformers' generic rope handling must not reinterpret it.
        self.ksa_rope = ksa_rope or {"type": "none", "theta": 10000.0}
        self.chunk_size, self.summary_tokens, self.skip_old_summary = chunk_size, summary_tokens, skip_old_summary
        self.ksa_layer_kinds = ksa_layer_kinds or ["ksa"] * num_hidden_layers  # "ksa" | "full" per layer
        self.ksa_layer_windows = ksa_layer_windows or [128] * num_hidden_layers  # W per layer
        self.summary_private = list(summary_private or [])
        self.initializer_range = initializer_range
        # Summary q/k/v = mix * summary projection + (1 - mix) * base projection, after qk-norm (the
        # official template's `mix_coeff`; keel's summary_mix_qkv schedule).
        self.summary_mix_coeff = summary_mix_coeff
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ------------------------------------------------------------------ the mask rule and layout
def ksa_visible(q_idx, k_idx, chunk_size: int, summary_tokens: int, window_chunks: int, skip_old_summary: bool):
    """True where expanded position q_idx may attend k_idx (broadcasting tensors)."""
    block = chunk_size + summary_tokens
    q_summary, k_summary = (q_idx % block) >= chunk_size, (k_idx % block) >= chunk_size
    distance = q_idx // block - k_idx // block
    summary_query = q_summary & (distance == 0)
    text_key_in_window = ~k_summary & (distance <= window_chunks)
    if skip_old_summary:
        text_query = ~q_summary & text_key_in_window
    else:
        text_query = ~q_summary & (text_key_in_window | (k_summary & (distance > window_chunks)))
    return (k_idx <= q_idx) & (summary_query | text_query)


class Layout:
    """Where the text and summary slots of an expanded sequence sit."""

    def __init__(self, text_len: int, chunk_size: int, summary_tokens: int, device):
        block = chunk_size + summary_tokens
        length = text_len + (text_len // chunk_size) * summary_tokens
        i = torch.arange(length, device=device)
        chunk, offset = i // block, i % block
        is_summary = offset >= chunk_size
        self.length = length
        # Summary s of a chunk takes the RoPE position of the chunk's text token (s+1)*N//S - 1 (>= 0).
        spread = (((offset - chunk_size).clamp(min=0) + 1) * chunk_size // summary_tokens - 1).clamp(min=0)
        self.text_index = chunk * chunk_size + torch.where(is_summary, spread, offset)
        j = torch.arange(text_len, device=device)
        self.text_cols = j + (j // chunk_size) * summary_tokens
        self.summary_cols = is_summary.nonzero().squeeze(1)
        self.order = torch.argsort(torch.cat([self.text_cols, self.summary_cols]))
        self.summary_ids = self.summary_cols % block - chunk_size

    def split_apply(self, x, text_fn, summary_fn):
        if summary_fn is None or self.summary_cols.numel() == 0:
            return text_fn(x)
        out = torch.cat([text_fn(x[:, self.text_cols]), summary_fn(x[:, self.summary_cols])], 1)
        return out[:, self.order]


# ------------------------------------------------------------------ modules
class KSARMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KSAMLP(nn.Module):
    def __init__(self, config: KSAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def rope_inv_freq(config: KSAConfig, device) -> torch.Tensor:
    r, dim = config.ksa_rope, config.head_dim
    inv_freq = 1.0 / float(r["theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if r["type"] == "linear":
        inv_freq = inv_freq / r["factor"]
    elif r["type"] == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = r["original_max_seq_len"] / r["low_freq_factor"]
        high_wavelen = r["original_max_seq_len"] / r["high_freq_factor"]
        smooth = ((r["original_max_seq_len"] / wavelen - r["low_freq_factor"])
                  / (r["high_freq_factor"] - r["low_freq_factor"]))
        blended = (1 - smooth) * inv_freq / r["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / r["factor"],
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq


def _summary_copy(make, name: str, config: KSAConfig, is_ksa: bool):
    return make() if is_ksa and name in config.summary_private else None


class KSAAttention(nn.Module):
    def __init__(self, config: KSAConfig, is_ksa: bool):
        super().__init__()
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.head_dim = hd
        self.config_mix = config.summary_mix_coeff
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)
        self.q_norm = KSARMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = KSARMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        if is_ksa:  # summary positions always have their own q/k/v projections
            self.q_proj_summary = nn.Linear(d, config.num_attention_heads * hd, bias=bias)
            self.k_proj_summary = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
            self.v_proj_summary = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj_summary = _summary_copy(lambda: nn.Linear(config.num_attention_heads * hd, d, bias=False),
                                            "wo", config, is_ksa)
        norm = lambda: KSARMSNorm(hd, config.rms_norm_eps)  # noqa: E731
        self.q_norm_summary = _summary_copy(norm, "q_norm", config, is_ksa)
        self.k_norm_summary = _summary_copy(norm, "k_norm", config, is_ksa)

    def forward(self, x, cos, sin, layout: Optional[Layout], mask):
        """layout None: plain causal attention with the base parameters (a full layer, on text only)."""
        batch, seq, _ = x.shape
        mix = float(self.config_mix)

        def project(name):
            base, summary = getattr(self, f"{name}_proj"), getattr(self, f"{name}_proj_summary", None)
            norm = getattr(self, f"{name}_norm", None)
            norm_summary = getattr(self, f"{name}_norm_summary", None)
            norm_summary = norm if norm_summary is None else norm_summary

            def run(p, n, t):
                t = p(t).view(*t.shape[:2], -1, self.head_dim)
                return t if n is None else n(t)

            def base_fn(t):
                return run(base, norm, t)

            def summary_fn(t):
                out = run(summary, norm_summary, t)
                return out if mix == 1.0 else mix * out + (1.0 - mix) * base_fn(t)

            return base_fn(x) if layout is None else layout.split_apply(x, base_fn, summary_fn)

        q, k, v = project("q"), project("k"), project("v")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out) if layout is None else layout.split_apply(out, self.o_proj, self.o_proj_summary)


class KSADecoderLayer(nn.Module):
    def __init__(self, config: KSAConfig, layer_idx: int):
        super().__init__()
        self.is_ksa = config.ksa_layer_kinds[layer_idx] == "ksa"
        self.window_chunks = config.ksa_layer_windows[layer_idx]
        eps = config.rms_norm_eps
        self.input_layernorm = KSARMSNorm(config.hidden_size, eps)
        self.self_attn = KSAAttention(config, self.is_ksa)
        self.post_attention_layernorm = KSARMSNorm(config.hidden_size, eps)
        self.mlp = KSAMLP(config)
        self.input_layernorm_summary = _summary_copy(lambda: KSARMSNorm(config.hidden_size, eps),
                                                     "attention_norm", config, self.is_ksa)
        self.post_attention_layernorm_summary = _summary_copy(lambda: KSARMSNorm(config.hidden_size, eps),
                                                              "ffn_norm", config, self.is_ksa)
        self.mlp_summary = _summary_copy(lambda: KSAMLP(config), "feed_forward", config, self.is_ksa)

    def forward(self, h, cos, sin, layout: Layout, masks: dict):
        if not self.is_ksa:  # causal attention + MLP on the text slots; summaries pass unchanged
            cols = layout.text_cols
            x = h[:, cols]
            x = x + self.self_attn(self.input_layernorm(x), cos[:, cols], sin[:, cols], None, None)
            x = x + self.mlp(self.post_attention_layernorm(x))
            return h.index_copy(1, cols, x)
        x = layout.split_apply(h, self.input_layernorm, self.input_layernorm_summary)
        h = h + self.self_attn(x, cos, sin, layout, masks[self.window_chunks])
        x = layout.split_apply(h, self.post_attention_layernorm, self.post_attention_layernorm_summary)
        return h + layout.split_apply(x, self.mlp, self.mlp_summary)


class KSAPreTrainedModel(PreTrainedModel):
    config_class = KSAConfig
    base_model_prefix = "model"
    _no_split_modules = ["KSADecoderLayer"]
    _supports_sdpa = True


class KSAModel(KSAPreTrainedModel):
    def __init__(self, config: KSAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.summary_embedding = nn.Embedding(config.summary_tokens, config.hidden_size)
        self.layers = nn.ModuleList(KSADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = KSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, position_ids=None):
        """Final-normed hidden states [B, T, D] at the text positions."""
        cfg = self.config
        batch, text_len = input_ids.shape
        device = input_ids.device
        layout = Layout(text_len, cfg.chunk_size, cfg.summary_tokens, device)
        h = torch.cat([self.embed_tokens(input_ids),
                       self.summary_embedding(layout.summary_ids)[None].expand(batch, -1, -1)], 1)[:, layout.order]
        if position_ids is None:
            position_ids = torch.arange(text_len, device=device).expand(batch, text_len)
        freqs = position_ids[:, layout.text_index].float()[..., None] * rope_inv_freq(cfg, device).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        i = torch.arange(layout.length, device=device)
        masks = {w: ksa_visible(i[:, None], i[None, :], cfg.chunk_size, cfg.summary_tokens, w,
                                cfg.skip_old_summary)[None, None]
                 for w in {layer.window_chunks for layer in self.layers if layer.is_ksa}}
        for layer in self.layers:
            h = layer(h, cos, sin, layout, masks)
        return self.norm(h[:, layout.text_cols])


class KSAForCausalLM(KSAPreTrainedModel, GenerationMixin):
    # transformers 5 names the tie as {tied: source}; 4.x as a list of tied names.
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"}
                          if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])

    def __init__(self, config: KSAConfig):
        super().__init__(config)
        self.model = KSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # no cache: the whole sequence

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("KSAForCausalLM: padded inputs (attention_mask with zeros) are not supported; "
                             "padding would shift the summary chunk grid. Run sequences unpadded.")
        logits = self.lm_head(self.model(input_ids, position_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
