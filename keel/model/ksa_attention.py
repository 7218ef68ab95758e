"""KSA attention cores over the expanded (text + summary) sequence, looked up by `model.ksa_attention`.

Every core takes q [B, Hq, L, D], k and v [B, Hkv, L, D] (normed, rotated), a `KSAMask` and the layer's
window (layers may differ: hybrid form 2, docs/ksa.md#hybrid-layers) and returns [B, Hq, L, D]; every core must
agree with `keel.kernels.ksa_layout.summary_attention_mask` (tests/test_ksa_model.py checks dense and flex).

  dense   boolean-mask SDPA: the reference, trains on CPU (O(L^2) mask).
  flex    torch FlexAttention with a BlockMask built from the same rule (no dense mask); compiled on
          GPU, eager on CPU (forward only there: FlexAttention has no CPU backward).
  triton  keel/kernels/ksa_attention.py's block-sparse kernel, imported when first used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from keel.errors import ConfigError
from keel.kernels.ksa_layout import ksa_visible


@dataclass
class KSAMask:
    """The full-sequence (training / no-cache) KSA pattern of one forward, shared by all its layers.

    doc_ids: [B, L] document id per expanded position (a summary takes its chunk's last text token's
    document), or None. With packed documents a query additionally sees only its own document:
    summaries are inserted every N tokens ignoring boundaries (as the reference does), so a chunk that
    straddles a boundary has its summary in the later document, summarising only that document's text.
    """
    chunk_size: int
    summary_tokens: int
    skip_old_summary: bool = False
    doc_ids: Optional[torch.Tensor] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def dense(self, seq_len: int, window_chunks: int, device) -> torch.Tensor:
        """Boolean [B or 1, 1, L, L] (True = attend); built once per forward per window size."""
        key = ("dense", seq_len, window_chunks, str(device))
        if key not in self._cache:
            i = torch.arange(seq_len, device=device)
            mask = ksa_visible(i[:, None], i[None, :], self.chunk_size, self.summary_tokens, window_chunks,
                               self.skip_old_summary)[None, None]
            if self.doc_ids is not None:
                mask = mask & (self.doc_ids[:, None, :, None] == self.doc_ids[:, None, None, :])
            self._cache[key] = mask
        return self._cache[key]

    def mask_mod(self, window_chunks: int) -> Callable:
        n, s, skip, docs = self.chunk_size, self.summary_tokens, self.skip_old_summary, self.doc_ids

        def mask_mod(b, h, q_idx, kv_idx):
            visible = ksa_visible(q_idx, kv_idx, n, s, window_chunks, skip)
            if docs is not None:
                visible = visible & (docs[b, q_idx] == docs[b, kv_idx])
            return visible
        return mask_mod


def dense_ksa_attention(q, k, v, mask: KSAMask, window_chunks: int) -> torch.Tensor:
    attn_mask = mask.dense(q.shape[2], window_chunks, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=q.shape[1] != k.shape[1])


_compiled_flex = None


def flex_ksa_attention(q, k, v, mask: KSAMask, window_chunks: int) -> torch.Tensor:

    global _compiled_flex
    seq_len, device = q.shape[2], q.device
    key = ("flex", seq_len, window_chunks, str(device))
    if key not in mask._cache:  # block sparsity computed once per forward per window, not per layer
        batch = None if mask.doc_ids is None else q.shape[0]
        mask._cache[key] = create_block_mask(mask.mask_mod(window_chunks), batch, None, seq_len, seq_len,
                                             device=device)
    attend = flex_attention
    if device.type == "cuda":  # eager flex materialises scores; compiled is the fused kernel
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        attend = _compiled_flex
    return attend(q, k, v, block_mask=mask._cache[key], enable_gqa=q.shape[1] != k.shape[1])


def triton_ksa_attention(q, k, v, mask: KSAMask, window_chunks: int) -> torch.Tensor:
    try:
        from keel.kernels.ksa_attention import ksa_attention  # lazy: imports triton (optional, GPU)
    except ImportError as e:
        raise ConfigError(f"model.ksa_attention: 'triton' needs keel.kernels.ksa_attention.ksa_attention, "
                          f"which could not be imported ({e}); use 'dense' or 'flex'") from None
    extra = {}
    if mask.doc_ids is not None:  # only passed when used, so kernels without these options stay valid
        extra["doc_ids"] = mask.doc_ids
    if mask.skip_old_summary:
        extra["skip_old_summary"] = True
    return ksa_attention(q, k, v, mask.chunk_size, mask.summary_tokens, window_chunks, **extra)


KSAAttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KSAMask, int], torch.Tensor]
KSA_ATTENTION_IMPLS: dict[str, KSAAttentionCore] = {
    "dense": dense_ksa_attention,
    "flex": flex_ksa_attention,
    "triton": triton_ksa_attention,
}
