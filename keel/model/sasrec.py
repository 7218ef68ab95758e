"""SASRec (Kang & McAuley 2018): the causal-transformer next-item baseline. Single-device code.

Item embedding + learned positions -> causal pre-norm blocks (backbone RMSNorm, Attention,
SwiGLU FeedForward; dropout on the embeddings and on each residual branch) -> the newest context
position's state scores every item with the tied item table (full softmax, no negative sampling).

Positions: learned, indexed from the newest (right) end of the left-padded context, so more left
padding moves nothing; backbone.Attention gets identity RoPE (cos 1, sin 0). With K > 1 targets per
context row every target is scored from the same last-position state (they share the context).

Entry points: model(batch) -> full-softmax CE summed over valid targets;
model(batch, score_items=True) -> logits [B, n_items + 1] with column 0 (padding) = -inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.attention import AttentionMask
from keel.model.backbone import Attention, FeedForward, RMSNorm, TransformerConfig


@dataclass
class SASRecConfig:
    name: str = "sasrec"  # the family
    dim: int = 64  # hidden size (= item embedding width, tied output)
    n_layers: int = 2  # transformer blocks
    n_heads: int = 2  # attention heads
    ffn_dim: int = 0  # SwiGLU hidden width; 0: 8/3 * dim rounded up to 64
    dropout: float = 0.0  # on the embeddings and on each residual branch (SASRec paper: 0.2-0.5)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # normal init std (residual output projections scaled by depth)
    context_len: int = 50  # most recent context items (learned position rows)
    n_items: int = 0  # items 1..n_items (0 = padding); filled by the task from the data

    def __post_init__(self):
        self.ffn_dim = self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)

    def validate(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "context_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(f"model.n_heads: {self.n_heads} must divide model.dim {self.dim} into even head widths")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.n_items < 0:
            raise ConfigError(f"model.n_items: must be >= 0 (0: filled by the task), got {self.n_items}")

    def backbone_config(self) -> TransformerConfig:
        return TransformerConfig(name=self.name, vocab_size=self.n_items + 1, dim=self.dim, n_layers=self.n_layers,
                                 n_heads=self.n_heads, ffn_dim=self.ffn_dim, norm_eps=self.norm_eps,
                                 init_std=self.init_std, max_seq_len=self.context_len)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters (`active` is the same: no experts); `embeddings`: the item and position tables."""
        block = 4 * self.dim * self.dim + 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = (self.n_items + 1 + self.context_len) * self.dim
        return self.n_layers * block + self.dim + (emb if embeddings else 0)


class SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.backbone_config())
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask: AttentionMask):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, mask))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.n_items <= 0:
            raise ConfigError("model.n_items: not set (the task fills it from the data before build)")
        cfg.validate()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.n_items + 1, cfg.dim)  # also the output layer (tied)
        self.positions = nn.Embedding(cfg.context_len, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): SASRecBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    @torch.no_grad()
    def init_buffers(self) -> None:
        pass  # no buffers: positions are learned

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        nn.init.normal_(self.positions.weight, std=std)
        for block in self.layers.values():
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv,
                        block.feed_forward.w1, block.feed_forward.w3):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            nn.init.normal_(block.feed_forward.w2.weight, std=out_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    def user_state(self, items: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The newest context position's final state [B, dim] for left-padded items [B, C]; `extra`
        [B, C, dim] is added to the input embeddings (a family's own per-item features)."""
        n_rows, n_ctx = items.shape
        slot = (self.config.context_len - n_ctx + torch.arange(n_ctx, device=items.device)).clamp(min=0)
        h = self.tok_embeddings(items) + self.positions(slot)
        h = self.dropout(h if extra is None else h + extra)
        valid = items != 0
        mask = AttentionMask(causal=True, key_valid=valid)
        mask.prepare(n_ctx, n_ctx, items.device)
        ones = h.new_ones(1, n_ctx, self.config.dim // self.config.n_heads, dtype=torch.float32)
        cos, sin = ones, torch.zeros_like(ones)  # identity RoPE: positions are the learned table's
        for block in self.layers.values():
            h = block(h, cos, sin, mask)
        return self.norm(h[:, -1])

    def forward(self, batch, score_items: bool = False):
        state = self.user_state(batch["ctx_items"])
        logits = F.linear(state, self.tok_embeddings.weight).float()
        logits[:, 0] = float("-inf")  # padding is never an item
        if score_items:
            return logits
        targets = batch["targets"]  # [B, K], 0 = padding
        logp = F.log_softmax(logits, -1)
        valid = targets != 0
        nll = -logp.gather(1, targets.clamp(min=1))  # padding targets read a finite column, then drop out
        return (nll * valid).sum()


def build_sasrec(cfg: SASRecConfig) -> SASRec:
    return SASRec(cfg)
