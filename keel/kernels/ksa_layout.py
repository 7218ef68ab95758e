"""KSA (Kwai Summary Attention) layout and attention-mask rule: which expanded position sees which.

A leaf of keel (torch only): the Triton kernel, its PyTorch reference and the KSA model all build on
these. The method and its equations: docs/ksa.md.

Expanded layout: after every N text tokens, S summary tokens are inserted:
    [t_0 .. t_{N-1}, s_0 .. s_{S-1}] [t_N .. t_{2N-1}, s ..] ...
Block length B = N + S; chunk id c(i) = i // B; position i is a summary iff i % B >= N.
A trailing partial chunk (fewer than N text tokens) gets no summaries.
RoPE: text keeps its own position; summary s of chunk i takes the position of text token
i*N + (s+1)*N//S - 1 (at least i*N): the reference's "last_chunk_slice_right" (`summary_offset`).
"""
from __future__ import annotations

import torch


def ksa_visible(q_idx, k_idx, chunk_size: int, summary_tokens: int, window_chunks: int,
                skip_old_summary: bool = False):
    """The KSA mask rule (docs/ksa.md#attention-pattern), elementwise on expanded indices.

    Broadcasting tensors; also a FlexAttention mask_mod body. q_idx/k_idx are indices in the expanded
    layout [t_0..t_{N-1}, s_0..s_{S-1}] [t_N ..] ...
    """
    block = chunk_size + summary_tokens
    q_summary = (q_idx % block) >= chunk_size
    k_summary = (k_idx % block) >= chunk_size
    chunk_distance = q_idx // block - k_idx // block
    summary_query = q_summary & (chunk_distance == 0)
    text_key_in_window = ~k_summary & (chunk_distance <= window_chunks)
    if skip_old_summary:  # sliding-chunk attention (the Hybrid-SCA baseline)
        text_query = ~q_summary & text_key_in_window
    else:
        text_query = ~q_summary & (text_key_in_window | (k_summary & (chunk_distance > window_chunks)))
    return (k_idx <= q_idx) & (summary_query | text_query)


def summary_offset(summary_index, chunk_size: int, summary_tokens: int):
    """Offset inside its chunk of the text token whose RoPE position summary `summary_index` (0..S-1)
    takes: (s+1)*N//S - 1, at least 0 (the reference's `last_chunk_slice_right`,
    muse/layers/summary_utils.py). S = 1 gives N - 1, the chunk's last text token; for S > 1 the S
    summaries are spread evenly over the chunk. Works on ints and integer tensors."""
    offset = ((summary_index + 1) * chunk_size) // summary_tokens - 1
    return offset.clamp(min=0) if isinstance(offset, torch.Tensor) else max(offset, 0)


def expanded_length(text_len: int, chunk_size: int, summary_tokens: int) -> int:
    """Length L of the expanded sequence for `text_len` text tokens (summaries only after full chunks)."""
    return text_len + (text_len // chunk_size) * summary_tokens


def expanded_layout(text_len: int, chunk_size: int, summary_tokens: int,
                    device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map text length -> expanded layout.

    Returns (text_index, is_summary), both of length L = expanded_length(...):
      text_index[i] = index of the text token at expanded position i, or for a summary s of chunk c the
                      text token c*N + summary_offset(s) whose RoPE position it takes (for S = 1 the
                      chunk's last text token; docs/ksa.md#layout-and-positions);
      is_summary[i] = True at summary positions.
    The expanded positions of the text tokens are `text_positions_in_expanded(...)`.
    """
    block = chunk_size + summary_tokens
    L = expanded_length(text_len, chunk_size, summary_tokens)
    i = torch.arange(L, device=device)
    chunk, offset = i // block, i % block
    is_summary = offset >= chunk_size
    spread = summary_offset((offset - chunk_size).clamp(min=0), chunk_size, summary_tokens)
    text_index = chunk * chunk_size + torch.where(is_summary, spread, offset)
    return text_index, is_summary


def text_positions_in_expanded(text_len: int, chunk_size: int, summary_tokens: int,
                               device=None) -> torch.Tensor:
    """Expanded index of each of the `text_len` text tokens: j + (j // N) * S."""
    j = torch.arange(text_len, device=device)
    return j + (j // chunk_size) * summary_tokens


def summary_attention_mask(seq_len: int, chunk_size: int, summary_tokens: int, window_chunks: int,
                           device=None, skip_old_summary: bool = False) -> torch.Tensor:
    """Boolean [L, L] KSA mask over the EXPANDED sequence (True = query row may attend key column).

    seq_len is the expanded length L (text + inserted summaries; see `expanded_length`). It need not be a
    multiple of B = N + S: positions follow the periodic layout, so a truncated sequence is a prefix.
    Rule (docs/ksa.md#attention-pattern; `build_summary_sliding_attention_mask` in the official code):
      summary query q: key k in the same chunk and k <= q (own chunk's text + earlier own summaries);
      text query q, k <= q and either
        k text    and c(q) - c(k) <= W  (own chunk causally, W previous chunks fully), or
        k summary and c(q) - c(k) >  W  (summaries of chunks older than the window).
    skip_old_summary=True drops the old-summary term: pure sliding-chunk attention (Hybrid-SCA baseline).
    """
    i = torch.arange(seq_len, device=device)
    return ksa_visible(i[:, None], i[None, :], chunk_size, summary_tokens, window_chunks, skip_old_summary)
