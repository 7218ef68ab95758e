"""KSA block-sparse attention in Triton: forward and backward (docs/ksa.md#attention-pattern, docs/ksa.md#kernels).

Layout: the expanded sequence, S summary tokens after every N text tokens; block B = N + S,
chunk c(i) = i // B, i is a summary iff i % B >= N. The mask is `keel.model.ksa.summary_attention_mask`:
a summary query sees its own chunk causally; a text query sees text of its own chunk (causally) and
of the W previous chunks, plus the summaries of chunks older than the window.

Why it is sparse. A query block [m0, m0+BLOCK_M) needs two kinds of keys:
  1. the raw window [(c(m0) - W) * B, m0 + BLOCK_M): its own chunks, the W previous chunks, the
     diagonal; about (W+1)*B + BLOCK_M positions, visited block by block with the exact mask;
  2. the summaries of chunks older than that window. With N=8, S=1 every raw 64-key block holds
     summaries, so skipping raw blocks would save nothing; instead the kernel GATHERS the summary
     rows (position (j // S) * B + N + j % S for summary index j) into dense BLOCK_N-wide tiles.
     Every text query of the block sees all of them, so the mask there is just "query is text".
Work per query is O(W*B + L*S/B) instead of O(L): the O(n/k) of the paper.

Backward (FlashAttention-2 style, lse saved by the forward, delta = rowsum(dO * O)):
  - dq: one program per query block, the same two key sets as the forward;
  - dk/dv for "local" pairs (everything except text-query -> old-summary): one program per raw key
    block over the queries that can see it, i.e. up to W chunks ahead; GQA heads summed in-program;
  - dk/dv for old-summary pairs: one program per gathered tile of summaries over all later text
    queries; it adds into the summary rows the local pass wrote (launched after it, same stream).

Block sizes (GPU): forward 64 x 64 tiles, backward 32 query x 64 key tiles, 8 warps, 2 stages.
Chosen without a GPU (none was lent to the session that wrote this) from the sm90 cubins Triton 3.9
builds on a CPU machine (bf16, head_dim 128; cuobjdump --dump-resource-usage): with 4 warps every
kernel hits 255 registers and spills (256-1184 B stack); 8 warps with 64 x 64 forward tiles spills
nothing (204 registers), and 32 x 64 backward tiles bring dq to 0 and dk/dv to 8 B of stack, where
64 x 64 left 96 and 288 B. Shared memory stays <= 65 KB. No timing stands behind this: tune with
bench/ksa_attention.py on a GPU. Under TRITON_INTERPRET=1 (CPU tests) the tiles are 16 x 16, the
smallest tl.dot accepts, so tiny test shapes still span several blocks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from keel.errors import KeelError, MissingExtraError

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU machines; ksa_attention says so when called
    triton = None

if triton is not None:

    @triton.jit
    def _local_mask(q_pos, k_pos, N: tl.constexpr, S: tl.constexpr, W):
        """Every allowed pair except text query -> summary older than the window (docs/ksa.md#attention-pattern)."""
        q_off = q_pos % (N + S)
        k_off = k_pos % (N + S)
        dist = (q_pos // (N + S))[:, None] - (k_pos // (N + S))[None, :]
        causal = k_pos[None, :] <= q_pos[:, None]
        summary_query = (q_off >= N)[:, None] & (dist == 0)
        text_query_text_key = (q_off < N)[:, None] & (k_off < N)[None, :] & (dist <= W)
        return causal & (summary_query | text_query_text_key)

    @triton.jit
    def _old_summary_mask(q_pos, k_pos, N: tl.constexpr, S: tl.constexpr, W):
        """Text query -> summary of a chunk older than the window (causal since dist > W >= 0)."""
        dist = (q_pos // (N + S))[:, None] - (k_pos // (N + S))[None, :]
        return ((q_pos % (N + S)) < N)[:, None] & ((k_pos % (N + S)) >= N)[None, :] & (dist > W)

    @triton.jit
    def _same_document(DOCS, b, L, q_pos, k_pos, q_ok, k_ok, HAS_DOCS: tl.constexpr):
        """Packed documents: a query sees only its own document's keys. Also applies the bounds."""
        if HAS_DOCS:
            q_doc = tl.load(DOCS + b * L + q_pos, mask=q_ok, other=-1)
            k_doc = tl.load(DOCS + b * L + k_pos, mask=k_ok, other=-2)
            return (q_doc[:, None] == k_doc[None, :]) & q_ok[:, None] & k_ok[None, :]
        else:
            return q_ok[:, None] & k_ok[None, :]

    @triton.jit
    def _summary_position(j, N: tl.constexpr, S: tl.constexpr):
        return (j // S) * (N + S) + N + j % S

    @triton.jit
    def _softmax_step(acc, m_i, l_i, q, k, v, valid, scale_log2, PRECISION: tl.constexpr):
        """One online-softmax update (log2 domain) with a [BLOCK_N, D] key and value tile."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _ksa_fwd_kernel(Q, K, V, O, LSE, DOCS, sqb, sqh, sql, skb, skh, skl, L, n_heads, group, W,
                        scale_log2, N: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, SKIP_OLD: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // n_heads, pid_bh % n_heads
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + (h // group) * skh
        v_base = V + b * skb + (h // group) * skh
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < L
        d_ok = offs_d < D
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        window_chunk = tl.maximum(m0 // (N + S) - W, 0)  # first chunk of the raw window
        # 1. gathered summaries of chunks before the window: seen by every text query of the block
        text_row = row_ok & ((offs_m % (N + S)) < N)
        n_old = window_chunk * S * (1 - SKIP_OLD)  # sliding-chunk baseline: no old summaries
        for j0 in range(0, n_old, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            j_ok = offs_j < n_old
            pos = _summary_position(offs_j, N, S)
            kv_off = pos[:, None] * skl + offs_d[None, :]
            kv_ok = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
            valid = _same_document(DOCS, b, L, offs_m, pos, text_row, j_ok, HAS_DOCS)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, valid, scale_log2, PRECISION)
        # 2. the raw window up to the diagonal, exact mask; keys before it were counted in 1.
        window_start = window_chunk * (N + S)
        for n0 in range((window_start // BLOCK_N) * BLOCK_N, tl.minimum(m0 + BLOCK_M, L), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < L) & (offs_n >= window_start)
            kv_off = offs_n[:, None] * skl + offs_d[None, :]
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
            valid = _local_mask(offs_m, offs_n, N, S, W)
            if SKIP_OLD == 0:
                valid = valid | _old_summary_mask(offs_m, offs_n, N, S, W)
            valid = valid & _same_document(DOCS, b, L, offs_m, offs_n, row_ok, n_ok, HAS_DOCS)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, valid, scale_log2, PRECISION)
        # every query sees at least itself, so l_i > 0 on real rows; padded rows are not stored
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _dq_step(dq, q, do, k, v, lse, delta, valid, scale_log2, PRECISION: tl.constexpr):
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    @triton.jit
    def _ksa_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, DOCS, sqb, sqh, sql, skb, skh, skl, L, n_heads, group, W,
                       scale, scale_log2, N: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, SKIP_OLD: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // n_heads, pid_bh % n_heads
        k_base = K + b * skb + (h // group) * skh
        v_base = V + b * skb + (h // group) * skh
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < L
        d_ok = offs_d < D
        q_off = b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :]
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_ok, other=0.0)
        do = tl.load(DO + q_off, mask=q_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        window_chunk = tl.maximum(m0 // (N + S) - W, 0)
        text_row = row_ok & ((offs_m % (N + S)) < N)
        n_old = window_chunk * S * (1 - SKIP_OLD)  # sliding-chunk baseline: no old summaries
        for j0 in range(0, n_old, BLOCK_N):  # same two key sets as the forward
            offs_j = j0 + tl.arange(0, BLOCK_N)
            j_ok = offs_j < n_old
            pos = _summary_position(offs_j, N, S)
            kv_off = pos[:, None] * skl + offs_d[None, :]
            kv_ok = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
            valid = _same_document(DOCS, b, L, offs_m, pos, text_row, j_ok, HAS_DOCS)
            dq = _dq_step(dq, q, do, k, v, lse, delta, valid, scale_log2, PRECISION)
        window_start = window_chunk * (N + S)
        for n0 in range((window_start // BLOCK_N) * BLOCK_N, tl.minimum(m0 + BLOCK_M, L), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < L) & (offs_n >= window_start)
            kv_off = offs_n[:, None] * skl + offs_d[None, :]
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
            valid = _local_mask(offs_m, offs_n, N, S, W)
            if SKIP_OLD == 0:
                valid = valid | _old_summary_mask(offs_m, offs_n, N, S, W)
            valid = valid & _same_document(DOCS, b, L, offs_m, offs_n, row_ok, n_ok, HAS_DOCS)
            dq = _dq_step(dq, q, do, k, v, lse, delta, valid, scale_log2, PRECISION)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_head_base, lse_base, offs_m, offs_d, row_ok, d_ok,
                   valid, sql, scale_log2, PRECISION: tl.constexpr):
        q_off = q_head_base + offs_m[:, None] * sql + offs_d[None, :]
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_ok, other=0.0)
        do = tl.load(DO + q_off, mask=q_ok, other=0.0)
        lse = tl.load(LSE + lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + lse_base + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _ksa_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DOCS, sqb, sqh, sql, skb, skh, skl, L, n_heads,
                         n_kv_heads, group, W, n_summaries, scale, scale_log2, N: tl.constexpr,
                         S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, OLD_SUMMARIES: tl.constexpr,
                         HAS_DOCS: tl.constexpr, SKIP_OLD: tl.constexpr):
        """OLD_SUMMARIES=False: raw key block, local pairs. True: gathered summary tile, old pairs."""
        pid_n, pid_bkv = tl.program_id(0), tl.program_id(1)
        b, kvh = pid_bkv // n_kv_heads, pid_bkv % n_kv_heads
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        n0 = pid_n * BLOCK_N
        if OLD_SUMMARIES:
            col_ok = (n0 + tl.arange(0, BLOCK_N)) < n_summaries
            offs_n = _summary_position(n0 + tl.arange(0, BLOCK_N), N, S)
            # the first text query that sees the tile's oldest summary, to the end of the sequence
            q_lo = (((n0 // S) + W + 1) * (N + S) // BLOCK_M) * BLOCK_M
            q_hi = L
        else:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < L
            q_lo = (n0 // BLOCK_M) * BLOCK_M
            # a key of chunk c is seen (locally) by queries up to chunk c + W
            q_hi = tl.minimum(((tl.minimum(n0 + BLOCK_N, L) - 1) // (N + S) + W + 1) * (N + S), L)
        kv_off = b * skb + kvh * skh + offs_n[:, None] * skl + offs_d[None, :]
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for hh in range(0, group):  # GQA: the query heads sharing this key head, summed here
            h = kvh * group + hh
            for m0 in range(q_lo, q_hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < L
                if OLD_SUMMARIES:
                    valid = _old_summary_mask(offs_m, offs_n, N, S, W)
                else:
                    valid = _local_mask(offs_m, offs_n, N, S, W)
                valid = valid & _same_document(DOCS, b, L, offs_m, offs_n, row_ok, col_ok, HAS_DOCS)
                dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, b * sqb + h * sqh, (b * n_heads + h) * L,
                                    offs_m, offs_d, row_ok, d_ok, valid, sql, scale_log2, PRECISION)
        dk = dk * scale
        if OLD_SUMMARIES:  # the local pass already wrote these rows: add to them
            dk += tl.load(DK + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
            dv += tl.load(DV + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


def _launch_config(device: torch.device, backward: bool) -> dict:
    if device.type == "cuda":  # register use checked on sm90 cubins (module docstring)
        return {"BLOCK_M": 32 if backward else 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 16, "BLOCK_N": 16}  # the interpreter: smallest tl.dot tile, no warps/stages


def _check_runnable(q: torch.Tensor) -> None:
    if triton is None:
        raise MissingExtraError("ksa_attention needs triton: pip install triton (or keel[dev]); "
                                "on CPU use keel.kernels.reference.ksa_attention_reference")
    interpreted = type(_ksa_fwd_kernel).__name__ == "InterpretedFunction"
    if q.device.type != "cuda" and not interpreted:
        raise KeelError(f"ksa_attention: the Triton KSA kernel needs a CUDA GPU (tensors are on {q.device}); "
                        "on CPU set TRITON_INTERPRET=1 before triton is imported (slow, for tests) or use "
                        "keel.kernels.reference.ksa_attention_reference")
    if interpreted and q.dtype == torch.bfloat16:  # measured: tl.dot on bf16 returns garbage there
        raise KeelError("ksa_attention: Triton's interpreter (TRITON_INTERPRET=1) computes bf16 tl.dot wrongly; "
                        "use fp32 or fp16 on CPU")


def _n_summaries(seq_len: int, chunk_size: int, summary_tokens: int) -> int:
    """Summary positions in an expanded sequence of seq_len (a trailing partial block may hold some)."""
    block = chunk_size + summary_tokens
    return (seq_len // block) * summary_tokens + max(0, seq_len % block - chunk_size)


def _common_args(q, k, pattern, backward=False):
    chunk_size, summary_tokens, window_chunks, scale, doc_ids, skip_old_summary = pattern
    batch, n_heads, seq_len, head_dim = q.shape
    meta = dict(N=chunk_size, S=summary_tokens, D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_DOCS=doc_ids is not None,
                SKIP_OLD=int(skip_old_summary), **_launch_config(q.device, backward))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    docs = q if doc_ids is None else doc_ids  # an unused pointer when there are no documents
    return batch, n_heads, seq_len, meta, (docs, *strides)


def _forward(q, k, v, pattern):
    batch, n_heads, seq_len, meta, args = _common_args(q, k, pattern)
    out = torch.empty_like(q)
    lse = torch.empty(batch * n_heads, seq_len, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * n_heads)
    _ksa_fwd_kernel[grid](q, k, v, out, lse, *args, seq_len, n_heads, n_heads // k.shape[1], pattern[2],
                          pattern[3] * math.log2(math.e), **meta)
    return out, lse


def _backward(q, k, v, out, lse, dout, pattern):
    chunk_size, summary_tokens, window_chunks, scale, _, skip_old_summary = pattern
    batch, n_heads, seq_len, meta, args = _common_args(q, k, pattern, backward=True)
    n_kv_heads, group = k.shape[1], n_heads // k.shape[1]
    delta = (out.float() * dout.float()).sum(-1).reshape(batch * n_heads, seq_len)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scale_log2 = scale * math.log2(math.e)
    grid = (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * n_heads)
    _ksa_dq_kernel[grid](q, k, v, dout, dq, lse, delta, *args, seq_len, n_heads, group, window_chunks, scale,
                         scale_log2, **meta)
    n_summaries = 0 if skip_old_summary else _n_summaries(seq_len, chunk_size, summary_tokens)
    for old_summaries, n_keys in ((False, seq_len), (True, n_summaries)):  # local pass first: the old one adds
        if n_keys == 0:
            continue
        grid = (triton.cdiv(n_keys, meta["BLOCK_N"]), batch * n_kv_heads)
        _ksa_dkdv_kernel[grid](q, k, v, dout, dk, dv, lse, delta, *args, seq_len, n_heads, n_kv_heads, group,
                               window_chunks, n_summaries, scale, scale_log2, OLD_SUMMARIES=old_summaries, **meta)
    return dq, dk, dv


class _KSAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern):
        out, lse = _forward(q, k, v, pattern)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern = pattern
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout.contiguous(), ctx.pattern)
        return dq, dk, dv, None


def ksa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, summary_tokens: int,
                  window_chunks: int, scale: Optional[float] = None, doc_ids: Optional[torch.Tensor] = None,
                  skip_old_summary: bool = False) -> torch.Tensor:
    """KSA attention over the expanded sequence, differentiable; equals `ksa_attention_reference`.

    q [B, H, L, D]; k, v [B, Hkv, L, D] with H a multiple of Hkv (GQA). L is any length (a truncated
    layout is a prefix of the periodic one). fp32, fp16 or bf16; accumulation is fp32. scale defaults
    to 1/sqrt(D). doc_ids [B, L] (packed documents): a query also needs the key's document to be its own.
    skip_old_summary: sliding-chunk attention, the Hybrid-SCA baseline (docs/ksa.md#attention-pattern).
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1; anywhere else it raises.
    """
    _check_runnable(q)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"ksa_attention: q must be [B, H, L, D] and k, v [B, Hkv, L, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ksa_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or "
                         "head_dim, or query heads are not a multiple of key heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ksa_attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if chunk_size < 1 or summary_tokens < 1 or window_chunks < 0:
        raise ValueError(f"ksa_attention: need chunk_size >= 1, summary_tokens >= 1, window_chunks >= 0; got "
                         f"{chunk_size}, {summary_tokens}, {window_chunks}")
    if doc_ids is not None:
        if doc_ids.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"ksa_attention: doc_ids must be [B, L] = {(q.shape[0], q.shape[2])}, "
                             f"got {tuple(doc_ids.shape)}")
        doc_ids = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pattern = (int(chunk_size), int(summary_tokens), int(window_chunks), scale, doc_ids, bool(skip_old_summary))
    return _KSAAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), pattern)
