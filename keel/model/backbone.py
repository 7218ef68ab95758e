"""The one decoder-only Transformer every keel family builds on. Single-device code only.

Llama / Qwen3 shape: RMSNorm, RoPE (rotate-half layout, as Hugging Face stores q/k), GQA,
optional QK-norm, SwiGLU MLP, tied or untied embeddings. Built on the meta device and then
materialised with `to_empty()` + `init_weights()`; parallelism is applied from keel/train.

Extension points for families: `attention` (a core name from model/attention.py), and the
overridable `embed()` / `hidden_states()` / `head_weight()` methods. `moe` (model/moe.py) swaps the
dense FFN of chosen layers for a Mixture-of-Experts one; `update_moe_balance()` / `moe_metrics()`
are the hooks the trainer finds by getattr (no-ops for a dense model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.attention import ATTENTION_CORES, AttentionMask, get_attention
from keel.model.generation import generate
from keel.model.loss import chunked_cross_entropy
from keel.model.moe import MoEConfig, MoEFeedForward, MoEHooks, moe_flops_params


@dataclass
class RopeScaling:
    # none; linear: positions / factor; llama3: Llama 3.1's frequency-dependent scaling
    type: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0  # scaling factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
    original_max_seq_len: int = 8192  # llama3: the context length the model was pretrained at


@dataclass
class TransformerConfig:
    name: str = "llama"  # the family (a registered model.name: llama, qwen3, ksa)
    vocab_size: int = 49152  # rows of the embedding table and the LM head
    dim: int = 256  # hidden size
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # 0: same as n_heads (no GQA)
    head_dim: int = 0  # 0: dim // n_heads
    ffn_dim: int = 0  # 0: 8/3 * dim rounded up to a multiple of 64
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qk_norm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = True  # the LM head shares the embedding table
    attention: str = "sdpa"  # attention core by name (model/attention.py)
    max_seq_len: int = 2048  # longest sequence the model is configured for (RoPE tables, HF export)
    init_std: float = 0.02  # std of the normal init of the weights (output projections scaled by depth)
    loss_chunk: int = 2048  # tokens per LM-head chunk: the full [tokens x vocab] never exists
    init_from: Optional[str] = None  # keel checkpoint, run dir or HF folder (safetensors) whose weights start training
    moe: Optional[MoEConfig] = None  # Mixture-of-Experts feed-forward in chosen layers; None: dense

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or (self.dim // self.n_heads if self.n_heads else 0)
        self.ffn_dim = self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)

    def validate(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "loss_chunk"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads: {self.n_kv_heads} does not divide model.n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim: must be even for RoPE, got {self.head_dim}")
        if self.attention not in ATTENTION_CORES:
            raise ConfigError(f"model.attention: unknown core {self.attention!r}; "
                              f"expected one of {sorted(ATTENTION_CORES)}")
        if self.rope_scaling.type != "none" and self.rope_scaling.factor <= 0:
            raise ConfigError(f"model.rope_scaling.factor: must be > 0, got {self.rope_scaling.factor}")
        if self.moe is not None:
            self.moe.validate(self.n_layers)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters; `active`: only those one token uses (top-k and shared experts of MoE layers)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        dense_ffn = 3 * self.dim * self.ffn_dim
        ffns = self.n_layers * dense_ffn
        if self.moe is not None:
            moe_total, moe_active = moe_flops_params(self.dim, self.ffn_dim, self.moe)
            n_moe = self.moe.moe_layer_count(self.n_layers)
            ffns += n_moe * ((moe_active if active else moe_total) - dense_ffn)
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + 2 * self.dim) + ffns + self.dim + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 N (matmuls) + 12 L H D S (attention), as in PaLM/TorchTitan.
        N counts active parameters: an MoE token pays for its top-k and shared experts only."""
        n = self.num_params(embeddings=False, active=True) + self.vocab_size * self.dim
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def rope_inv_freq(cfg: TransformerConfig) -> torch.Tensor:
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    s = cfg.rope_scaling
    if s.type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = s.original_max_seq_len / s.low_freq_factor
        high_wavelen = s.original_max_seq_len / s.high_freq_factor
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / s.factor,
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; cos/sin [B, L, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, then scale in the input dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.core = get_attention(cfg.attention)

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)  # -1: heads may be TP-sharded
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.core(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def feed_forward_for(cfg: TransformerConfig, layer_index: int) -> nn.Module:
    """Block `layer_index`'s FFN: MoE where cfg.moe puts experts, else the dense SwiGLU."""
    if cfg.moe is not None and cfg.moe.is_moe_layer(layer_index):
        return MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.moe)
    return FeedForward(cfg.dim, cfg.ffn_dim)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer_index: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = feed_forward_for(cfg, layer_index)

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


@torch.no_grad()
def init_feed_forward(ffn: nn.Module, std: float, out_std: float) -> None:
    """A dense SwiGLU (w2, the residual-branch output, at out_std) or an MoE layer's own init."""
    if isinstance(ffn, MoEFeedForward):
        ffn.init_weights(std, out_std)
    else:
        nn.init.normal_(ffn.w1.weight, std=std)
        nn.init.normal_(ffn.w3.weight, std=std)
        nn.init.normal_(ffn.w2.weight, std=out_std)


@torch.no_grad()
def init_block(block: TransformerBlock, std: float, out_std: float) -> None:
    """Normal init of a block's projections, the residual-branch outputs (wo, w2) at out_std, and
    unit norms. Every module built of backbone blocks initialises them through this one function."""
    for lin in (block.attention.wq, block.attention.wk, block.attention.wv):
        nn.init.normal_(lin.weight, std=std)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    nn.init.normal_(block.attention.wo.weight, std=out_std)
    init_feed_forward(block.feed_forward, std, out_std)
    for norm in (block.attention_norm, block.ffn_norm, block.attention.q_norm, block.attention.k_norm):
        if norm is not None:
            norm.reset_parameters()


class Transformer(MoEHooks, nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0".."n-1" keeps checkpoint keys stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_buffers(self) -> None:
        self.rope_inv_freq.copy_(rope_inv_freq(self.config).to(self.rope_inv_freq.device))

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        self.init_buffers()
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        # Residual-branch outputs are scaled down with depth so the stream's variance stays put.
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for block in self.layers.values():
            init_block(block, cfg.init_std, out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=cfg.init_std)

    # ------------------------------------------------------------ extension points
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def rope(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.rope_inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def hidden_states(self, input_ids, positions=None, doc_ids=None, cache=None) -> torch.Tensor:
        """Final-normed hidden states [B, L, dim].

        `input_ids` may instead hold hidden states [B, L, dim] (floating point): a pipeline stage
        after the first receives the previous stage's activations. A model without `norm` (a stage
        before the last) returns its blocks' output un-normed.
        """
        batch, seq = input_ids.shape[:2]
        if cache is not None:
            positions, mask = cache.positions_and_mask(seq)
        else:
            if positions is None:
                positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            mask = AttentionMask(causal=True, doc_ids=doc_ids)
            mask.prepare(seq, seq, input_ids.device)
        cos, sin = self.rope(positions)
        h = input_ids if input_ids.is_floating_point() else self.embed(input_ids)
        for i, block in enumerate(self.layers.values()):
            h = block(h, cos, sin, mask, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.advance(seq)
        return h if self.norm is None else self.norm(h)

    # ------------------------------------------------------------ forward
    def forward(self, input_ids, labels=None, positions=None, doc_ids=None, cache=None):
        """Logits [B, L, V] without labels; with labels, the summed next-token loss over the
        tokens whose label is not -100 (the caller divides by its global token count)."""
        h = self.hidden_states(input_ids, positions, doc_ids, cache)
        if self.norm is None:  # a pipeline stage before the last hands its activations on
            return self.carry_moe_aux_loss(h, labels)
        weight = self.head_weight()
        if labels is None:
            return F.linear(h, weight)
        loss = chunked_cross_entropy(h.flatten(0, 1), weight, labels.flatten(), self.config.loss_chunk)
        aux = self.take_moe_aux_loss()
        if torch.is_tensor(aux):  # per-token MoE losses join the summed loss weighted by this batch's loss tokens
            loss = loss + aux * (labels != -100).sum()
        return loss

    def generate(self, prompts, **sampling):
        return generate(self, prompts, **sampling)
