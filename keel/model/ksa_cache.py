"""KSA decode cache: O(W*N + n*S/N) keys per KSA layer, for batches of left-padded prompts.

Per KSA layer and batch row the cache keeps
  a text ring of (W+1)*N - 1 slots: the raw text any future query of that layer can see (the current
    chunk and the W previous ones) except the query's own token, which comes with the step;
    slot = text index mod ring size; and
  a summary store, append-only, slot = chunk * S + s (summaries are what reaches past the window).
RoPE is applied before caching, so physical order is irrelevant: every slot records its index `g` in
the row's own expanded sequence (-1 = empty) and the mask is the KSA rule (docs/ksa.md#attention-pattern)
on g, the very function the training cores use (`ksa_visible`). Full-attention layers see only text and
keep a plain keel.model.generation.KVCache.

Rows are at different chunk phases (left padding), so a step's input is, per row, its new text tokens
followed by the summary tokens of the chunks those tokens complete; rows completing fewer chunks get
empty (g = -1) summary slots. The model runs a step as [B, T text columns | K*S summary columns].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keel.kernels.ksa_layout import ksa_visible, summary_offset
from keel.model.generation import KVCache


@dataclass
class DecodeStep:
    """Layout of one cached forward over [B, E] slots (E = T text columns + K*S summary columns)."""
    g: torch.Tensor  # [B, E] index in the row's expanded sequence, -1 for padding / unused slots
    positions: torch.Tensor  # [B, E] RoPE positions (summary s of chunk c: c*N + summary_offset(s))
    summary_ids: torch.Tensor  # [B, K*S] which summary embedding row (0..S-1) each summary column uses
    text_index: torch.Tensor  # [B, T] text index per text column, -1 for padding
    n_text: int


class KSALayerCache:
    def __init__(self, owner: "KSACache", batch, n_kv_heads, head_dim, window_chunks, dtype, device):
        n, s = owner.chunk_size, owner.summary_tokens
        self.owner, self.window_chunks = owner, window_chunks
        self.ring = max((window_chunks + 1) * n - 1, 1)
        self.store = (owner.max_len // n) * s
        slots = self.ring + 1 + self.store + 1  # +1 each: a trash slot that unused writes land in
        self.k = torch.zeros(batch, n_kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.g = torch.full((batch, slots), -1, dtype=torch.long, device=device)

    def attend(self, q, k, v) -> torch.Tensor:
        """Attention of the step's queries over cached + step keys; then the step's keys are cached."""
        o = self.owner
        step = o.step
        keys, values = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        key_g = torch.cat([self.g, step.g], 1)
        q_g = step.g[:, :, None]
        visible = ksa_visible(q_g, key_g[:, None, :], o.chunk_size, o.summary_tokens, self.window_chunks,
                              o.skip_old_summary) & (key_g[:, None, :] >= 0) & (q_g >= 0)
        # An unused query slot sees only itself so its row stays finite (its output is discarded).
        slots, width = self.k.shape[2], step.g.shape[1]
        own = torch.arange(width, device=q.device)
        self_key = torch.zeros(width, slots + width, dtype=torch.bool, device=q.device)
        self_key[own, slots + own] = True
        visible = visible | ((q_g < 0) & self_key)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None],
                                             enable_gqa=q.shape[1] != k.shape[1])
        self._write(k, v, step)
        return out

    def _write(self, k, v, step: DecodeStep) -> None:
        o, t = self.owner, step.n_text
        n, s = o.chunk_size, o.summary_tokens
        # Text: only each row's latest `ring` tokens (a long prefill would otherwise collide in the ring).
        j = step.text_index
        keep = (j >= 0) & (j > o.n_text[:, None] - 1 - self.ring)
        text_slot = torch.where(keep, j % self.ring, self.ring)
        g = step.g[:, t:]
        chunk = g // (n + s)
        summary_slot = torch.where(g >= 0, self.ring + 1 + chunk * s + (g % (n + s) - n), self.k.shape[2] - 1)
        slot = torch.cat([text_slot, summary_slot], 1)
        index = slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.g.scatter_(1, slot, torch.cat([torch.where(keep, step.g[:, :t], -1), g], 1))
        self.g[:, self.ring] = -1  # trash slots never hold a visible key
        self.g[:, -1] = -1


class KSACache:
    """Decode state of a KSA model: per-KSA-layer caches, a text KVCache for full layers, text counts."""

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        param = model.tok_embeddings.weight
        self.chunk_size, self.summary_tokens = cfg.chunk_size, cfg.summary_tokens
        self.skip_old_summary = cfg.skip_old_summary
        self.max_len = max_len  # text tokens (prompt incl. padding + generated)
        self.n_text = torch.zeros(batch, dtype=torch.long, device=param.device)  # real text tokens so far
        self.ksa_layers, full_index = {}, {}
        windows = [b.attention.window_chunks for b in model.layers.values() if getattr(b, "is_ksa", False)]
        # decode_large_window_as_full (the official HF cache): a window above the smallest one covers all
        # past text at decode (and so no summaries); summary queries keep their own-chunk rule.
        everything = max_len // self.chunk_size + 1
        for i, block in enumerate(model.layers.values()):
            if getattr(block, "is_ksa", False):
                window = block.attention.window_chunks
                if cfg.decode_large_window_as_full and window > min(windows):
                    window = max(window, everything)
                self.ksa_layers[i] = KSALayerCache(self, batch, cfg.n_kv_heads, cfg.head_dim, window,
                                                   param.dtype, param.device)
            else:
                full_index[i] = len(full_index)
        self.full_index = full_index
        self.full = KVCache(len(full_index), batch, cfg.n_kv_heads, cfg.head_dim, max_len, param.dtype,
                            param.device)
        self.pending_valid = None
        self.step = None

    # ---- the KVCache protocol generation.generate() drives
    def append_valid(self, valid: torch.Tensor) -> None:
        self.pending_valid = valid.to(self.n_text.device)

    def layer(self, index: int):
        return self.ksa_layers[index] if index in self.ksa_layers else self.full.layer(self.full_index[index])

    def full_mask(self, seq: int):
        return self.full.positions_and_mask(seq)[1]

    def begin_step(self, seq: int) -> DecodeStep:
        """Lay out a step of `seq` new text tokens per row (validity from append_valid, else all real)."""
        n, s, device = self.chunk_size, self.summary_tokens, self.n_text.device
        valid = self.pending_valid
        if valid is None or valid.shape[1] != seq:
            valid = torch.ones(self.n_text.shape[0], seq, dtype=torch.bool, device=device)
        self.pending_valid = None
        self.full.append_valid(valid)
        j = self.n_text[:, None] + valid.long().cumsum(1) - 1
        text_index = torch.where(valid, j, -1)
        text_g = torch.where(valid, j + (j // n) * s, -1)
        # Chunks completed by this step's tokens, sorted per row; rows with fewer get unused slots.
        completes = valid & ((j + 1) % n == 0)
        k = int(completes.sum(1).max())
        big = torch.iinfo(torch.long).max
        chunks = torch.where(completes, j // n, big).sort(1).values[:, :k]
        used = (chunks != big).repeat_interleave(s, 1)
        chunks = torch.where(chunks == big, 0, chunks).repeat_interleave(s, 1)
        summary_ids = torch.arange(s, device=device).repeat(k)[None].expand_as(chunks)
        summary_g = torch.where(used, chunks * (n + s) + n + summary_ids, -1)
        positions = torch.cat([j.clamp(min=0), chunks * n + summary_offset(summary_ids, n, s)], 1)
        self.step = DecodeStep(torch.cat([text_g, summary_g], 1), positions, summary_ids, text_index, seq)
        self.n_text = self.n_text + valid.long().sum(1)
        return self.step

    def advance(self, seq: int) -> None:
        self.full.advance(seq)
        self.step = None

    def entries_per_layer(self) -> dict[int, int]:
        """Key/value slots allocated per KSA layer (ring + summary store), for KV-size reporting."""
        return {i: c.k.shape[2] for i, c in self.ksa_layers.items()}
