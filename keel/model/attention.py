"""Attention cores, looked up by name from the model config.

A core receives q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (already normed and rotated; GQA is the
core's business) and an AttentionMask that says which query may see which key, and returns
[B, Hq, Lq, D]. The block never builds masks itself, so a family with its own pattern (KSA's
summary tokens, lazy cross-attention) registers a core and a mask and leaves the block alone.

The "sdpa" core picks a kernel per call: plain causal goes to SDPA's is_causal path (flash on GPU);
packed documents on GPU go to FlexAttention with a block-sparse mask (no [B, L, L] mask, and no
fallback to SDPA's math kernel, which GQA plus a mask forces); everything else (CPU, cached decode,
padding) goes to `dense_attention`, the boolean-mask reference that every other path must match.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)


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
    doc_ids: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    _dense_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _block_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_plain_causal(self) -> bool:
        return self.causal and self.q_offset == 0 and self.doc_ids is None and self.key_valid is None

    def dense(self, q_len: int, k_len: int, device) -> torch.Tensor | None:
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

    def prepare(self, q_len: int, k_len: int, device) -> None:
        """Build now the mask the "sdpa" core will use, before the layers run: first built inside a
        checkpointed, compiled block it would be a side effect torch.compile refuses."""
        if self.is_plain_causal and q_len == k_len:
            return
        if _flex_serves(torch.device(device), self, q_len):
            self.document_block_mask(q_len, device)
        else:
            self.dense(q_len, k_len, device)

    def document_block_mask(self, seq_len: int, device) -> BlockMask:
        """FlexAttention's block-sparse form of causal + same-document, for Lq == Lk == seq_len and
        no cache or padding. Built once per forward (block sparsity is a pass over all L x L pairs)."""
        key = (seq_len, str(device))
        if key not in self._block_cache:
            docs = self.doc_ids

            def document_causal(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
            # H=None: one mask for all heads, so tensor-parallel head shards share it.
            self._block_cache[key] = create_block_mask(document_causal, docs.shape[0], None, seq_len, seq_len,
                                                       device=device)
        return self._block_cache[key]


def dense_attention(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """SDPA with the mask materialised as a boolean [B, 1, Lq, Lk]: any mask, any device, and the
    reference the faster paths are tested against."""
    attn_mask = mask.dense(q.shape[2], k.shape[2], q.device)
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


_compiled_flex = None


def flex_document_attention(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """Causal attention inside packed documents with FlexAttention, on any device (forward only on
    CPU: FlexAttention has no CPU backward). Lengths need not be multiples of the 128 block size."""
    global _compiled_flex
    block_mask = mask.document_block_mask(q.shape[2], q.device)
    attend = flex_attention
    # Eager flex materialises the scores; only the compiled call is the fused kernel. Inside an
    # already-compiled block (parallel.compile) the plain call is traced into the fused kernel.
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        attend = _compiled_flex
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


DOCUMENT_ATTENTION_BACKENDS: dict[str, Callable] = {"dense": dense_attention, "flex": flex_document_attention}


def _flex_serves(device: torch.device, mask: AttentionMask, q_len: int) -> bool:
    return (device.type == "cuda" and mask.doc_ids is not None and mask.causal and mask.q_offset == 0
            and mask.key_valid is None and mask.doc_ids.shape[1] == q_len)


def document_attention_backend(q, mask: AttentionMask) -> str:
    """Which backend serves a mask that is not plain causal. Flex only where it pays and is exact to
    the block mask: on GPU (it has no CPU backward), for a full causal sequence (doc_ids cover the
    queries' own keys: no cache offset, no padding)."""
    return "flex" if _flex_serves(q.device, mask, q.shape[2]) else "dense"


def sdpa_attention(q, k, v, mask: AttentionMask) -> torch.Tensor:
    if mask.is_plain_causal and q.shape[2] == k.shape[2]:  # no mask at all: SDPA's flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return DOCUMENT_ATTENTION_BACKENDS[document_attention_backend(q, mask)](q, k, v, mask)


AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask], torch.Tensor]
ATTENTION_CORES: dict[str, AttentionCore] = {"sdpa": sdpa_attention}


def register_attention(name: str):
    def wrap(fn: AttentionCore) -> AttentionCore:
        ATTENTION_CORES[name] = fn
        return fn
    return wrap


def get_attention(name: str) -> AttentionCore:
    return ATTENTION_CORES[name]
