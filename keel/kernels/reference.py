"""Pure-PyTorch references for the Triton kernels in keel.kernels: slow, dense, obviously right.

Each reference is what its kernel is tested against (under TRITON_INTERPRET=1 on CPU) and what CPU
training uses, since Triton needs a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from keel.kernels.ksa_layout import summary_attention_mask


def ksa_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                            summary_tokens: int, window_chunks: int, scale: Optional[float] = None,
                            doc_ids: Optional[torch.Tensor] = None,
                            skip_old_summary: bool = False) -> torch.Tensor:
    """KSA attention as SDPA with the dense [L, L] mask of docs/ksa.md#attention-pattern.

    q [B, H, L, D], k/v [B, Hkv, L, D] over the expanded sequence (S summaries after every N text
    tokens); H must be a multiple of Hkv (GQA). doc_ids [B, L]: a query also needs the key's document
    to be its own (packed documents). Memory is O(L^2): for tests and short CPU runs only.
    """
    seq_len = q.shape[2]
    mask = summary_attention_mask(seq_len, chunk_size, summary_tokens, window_chunks, device=q.device,
                                  skip_old_summary=skip_old_summary)[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
