"""Attention cores, looked up by name from the model config.

A core receives q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (already normed and rotated; GQA is the
core's business) and an AttentionMask that says which query may see which key, and returns
[B, Hq, Lq, D]. The block never builds masks itself, so a family with its own pattern (KSA's
summary tokens, lazy cross-attention) registers a core and a mask and leaves the block alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class AttentionMask:
    """Who attends to whom, described rather than materialised.

    causal: query i sees keys j <= i + q_offset (q_offset = keys already cached before the queries).
    doc_ids: [B, Lk] document id per key position; a query sees only keys of its own document
             (packed sequences). The queries' ids are the last Lq entries.
    key_valid: [B, Lk] bool, False for padding (left-padded prompts in batched generation).
    """
    causal: bool = True
    q_offset: int = 0
    doc_ids: Optional[torch.Tensor] = None
    key_valid: Optional[torch.Tensor] = None
    _dense_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_plain_causal(self) -> bool:
        return self.causal and self.q_offset == 0 and self.doc_ids is None and self.key_valid is None

    def dense(self, q_len: int, k_len: int, device) -> Optional[torch.Tensor]:
        """A boolean [B or 1, 1, Lq, Lk] mask (True = attend), or None when plain causal."""
        if self.is_plain_causal and q_len == k_len:
            return None
        key = (q_len, k_len, str(device))
        if key not in self._dense_cache:  # built once per forward, shared by every layer
            self._dense_cache[key] = self._build_dense(q_len, k_len, device)
        return self._dense_cache[key]

    def _build_dense(self, q_len: int, k_len: int, device) -> torch.Tensor:
        mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
        if self.causal:
            q_pos = torch.arange(q_len, device=device) + self.q_offset
            mask = mask & (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])
        if self.doc_ids is not None:
            q_doc = self.doc_ids[:, -q_len:]
            mask = mask & (q_doc[:, None, :, None] == self.doc_ids[:, None, None, :])
        if self.key_valid is not None:
            mask = mask & self.key_valid[:, None, None, :]
            # A padding query would see no key at all and turn NaN, and NaN values poison later
            # layers even under a zero weight; letting every query see itself keeps rows finite.
            self_key = torch.arange(q_len, device=device) + self.q_offset
            mask = mask | (torch.arange(k_len, device=device)[None, :] == self_key[:, None])
        return mask


def sdpa_attention(q, k, v, mask: AttentionMask) -> torch.Tensor:
    dense = mask.dense(q.shape[2], k.shape[2], q.device)
    gqa = q.shape[1] != k.shape[1]
    if dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)


AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask], torch.Tensor]
ATTENTION_CORES: dict[str, AttentionCore] = {"sdpa": sdpa_attention}


def register_attention(name: str):
    def wrap(fn: AttentionCore) -> AttentionCore:
        ATTENTION_CORES[name] = fn
        return fn
    return wrap


def get_attention(name: str) -> AttentionCore:
    return ATTENTION_CORES[name]
