"""KSA attention: Triton block-sparse kernel vs FlexAttention vs dense causal SDPA, and KV-cache bytes.

    python bench/ksa_attention.py                    # GPU if present: 8k, 32k, 128k text tokens, bf16
    python bench/ksa_attention.py --sizes 1024,2048  # CPU: small sizes, fp32

Shapes follow the 4B CPT production model of docs/ksa.md#training-recipes (32 query / 8 KV heads,
head_dim 128, N=8, S=1, W=128 chunks); on CPU `--heads 4 --kv-heads 1` by default to fit the time.
What is timed (median of --repeats after a warm-up; forward + backward unless said otherwise):
  triton  keel.kernels.ksa_attention over the expanded sequence (L = n + n/N*S positions);
  flex    torch.compile(flex_attention) with a BlockMask from the same rule (keel.model.ksa_attention);
          on CPU forward only (FlexAttention has no CPU backward);
  dense   causal SDPA over the n text tokens, i.e. what the dense model runs (k/v expanded to all
          heads beforehand, so the fused kernels apply);
  ksa-ref (CPU only) the dense-mask SDPA reference, KSA's CPU training path.
On CPU the Triton kernel runs only under TRITON_INTERPRET=1 (numpy, set by this script), at a tiny
size, to show it runs: its time says nothing about speed.
Also printed, as arithmetic that runs anywhere: the kernel's visited 64x64 tiles vs a causal flash
kernel's, and KV-cache bytes of the 3:1 hybrid vs dense at 32k and 128k.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # must precede the first triton import (the kernel module's)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from keel.model.ksa import expanded_length  # noqa: E402

# 4B CPT production shape (docs/ksa.md#training-recipes): 36 layers, 32/8 heads, head_dim 128;
# released KSA settings (docs/ksa.md#hybrid-layers): chunk 8, 1 summary, 128-chunk window,
# 3 KSA : 1 full.
PROD = dict(layers=36, kv_heads=8, head_dim=128, chunk=8, summaries=1, window=128, ksa_per_full=3)


def kv_cache_report(bytes_per_value: int = 2) -> None:
    p = PROD
    per_entry = 2 * p["kv_heads"] * p["head_dim"] * bytes_per_value  # K and V of one position, one layer
    ksa_layers = p["layers"] * p["ksa_per_full"] // (p["ksa_per_full"] + 1)
    full_layers = p["layers"] - ksa_layers
    print(f"\nKV cache, 4B hybrid ({ksa_layers} KSA + {full_layers} full layers, {p['kv_heads']} KV heads x "
          f"{p['head_dim']}, bf16); KSA layer keeps W*N + n*S/N entries (the current partial chunk, <= N, "
          "is left out)")
    print(f"{'context':>8} {'dense GB':>9} {'hybrid GB':>10} {'hybrid/dense':>13}")
    for n in (32768, 131072):
        dense = p["layers"] * n * per_entry
        ksa_entries = p["window"] * p["chunk"] + n * p["summaries"] // p["chunk"]
        ksa = (ksa_layers * ksa_entries + full_layers * n) * per_entry
        print(f"{n:>8} {dense / 1e9:>9.2f} {ksa / 1e9:>10.2f} {ksa / dense:>12.3f}x")
    print("paper (4B, 128k): 7.5 vs 18.6 GB = 0.403x; goal <= 0.4x")


def tile_report(sizes: list[int], block: int = 64) -> None:
    """Tiles the Triton kernel visits (its loop bounds, 64x64 as on GPU) vs a causal flash kernel."""
    p = PROD
    n_, s_, w_ = p["chunk"], p["summaries"], p["window"]
    print(f"\nForward tiles visited ({block}x{block}): KSA kernel over L expanded vs causal over n text")
    print(f"{'n text':>8} {'L':>8} {'KSA tiles':>12} {'causal tiles':>13} {'causal/KSA':>11}")
    for n in sizes:
        L = expanded_length(n, n_, s_)
        ksa = 0
        for m0 in range(0, L, block):
            window_chunk = max(m0 // (n_ + s_) - w_, 0)
            ksa += -(-window_chunk * s_ // block)  # gathered old-summary tiles
            ksa += -(-(min(m0 + block, L) - window_chunk * (n_ + s_) // block * block) // block)
        causal = sum(m0 // block + 1 for m0 in range(0, n, block))
        print(f"{n:>8} {L:>8} {ksa:>12} {causal:>13} {causal / ksa:>10.2f}x")


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(attend, inputs, grad_out):
    def step():
        for t in inputs:
            t.grad = None
        attend(*inputs).backward(grad_out)
    return step


def bench_size(n: int, args, device, dtype, sync) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from keel.model.ksa_attention import KSAMask
    from keel.kernels.ksa_attention import ksa_attention
    from keel.kernels.reference import ksa_attention_reference
    import torch.nn.functional as F

    N, S, W = args.chunk, args.summaries, args.window
    L = expanded_length(n, N, S)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(heads, length):
        return torch.randn(1, heads, length, args.head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()

    q, k, v = rand(args.heads, L), rand(args.kv_heads, L), rand(args.kv_heads, L)
    dq, dk, dv = rand(args.heads, n), rand(args.heads, n), rand(args.heads, n)  # dense: all heads
    grad_ksa, grad_dense = torch.randn_like(q), torch.randn_like(dq)
    on_gpu = device.type == "cuda"
    block_mask = create_block_mask(KSAMask(N, S).mask_mod(W), None, None, L, L, device=device, _compile=on_gpu)
    # FlexAttention skips only all-masked 128x128 blocks; with a summary every N+S positions almost
    # every block below the diagonal holds one, so its sparsity stays near causal's ~50%
    print(f"  n={n}: flex BlockMask sparsity {block_mask.sparsity():.1f}% of blocks skipped")
    flex = torch.compile(flex_attention)
    flex_call = lambda a, b, c: flex(a, b, c, block_mask=block_mask, enable_gqa=True)  # noqa: E731
    dense_call = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    plans = {"dense": (fwd_bwd(dense_call, (dq, dk, dv), grad_dense), "fwd+bwd")}
    if on_gpu:
        plans["triton"] = (fwd_bwd(lambda a, b, c: ksa_attention(a, b, c, N, S, W), (q, k, v), grad_ksa), "fwd+bwd")
        plans["flex"] = (fwd_bwd(flex_call, (q, k, v), grad_ksa), "fwd+bwd")
    else:
        plans["ksa-ref"] = (fwd_bwd(lambda a, b, c: ksa_attention_reference(a, b, c, N, S, W), (q, k, v), grad_ksa),
                            "fwd+bwd")
        # FlexAttention refuses CPU inputs that require grad, even under no_grad
        qf, kf, vf, dqf, dkf, dvf = (t.detach() for t in (q, k, v, dq, dk, dv))
        plans["dense fwd"] = (lambda: dense_call(dqf, dkf, dvf), "fwd")
        plans["flex"] = (lambda: flex_call(qf, kf, vf), "fwd")
        # the same output as the reference: the block mask is the KSA mask (docs/ksa.md#attention-pattern)
        if n <= 2048:
            err = (flex_call(qf, kf, vf) - ksa_attention_reference(qf, kf, vf, N, S, W)).abs().max().item()
            print(f"  n={n}: flex vs dense-mask reference max |diff| {err:.2e}")
    results = {}
    for name, (fn, what) in plans.items():
        try:
            grad_ctx = torch.no_grad() if what == "fwd" else torch.enable_grad()
            with grad_ctx:
                results[name] = (timed(fn, args.repeats, sync), what)
        except torch.OutOfMemoryError:
            results[name] = (None, f"{what}, OOM")
            torch.cuda.empty_cache()
    return results


def triton_interpreter_demo() -> None:
    from keel.kernels.ksa_attention import ksa_attention
    from keel.kernels.reference import ksa_attention_reference
    q, k, v = (torch.randn(1, h, 96, 16, requires_grad=True) for h in (4, 1, 1))
    start = time.perf_counter()
    ksa_attention(q, k, v, 8, 1, 2).sum().backward()
    took = time.perf_counter() - start
    ref = ksa_attention_reference(q, k, v, 8, 1, 2)
    err = (ksa_attention(q, k, v, 8, 1, 2) - ref).abs().max().item()
    print(f"\nTriton kernel under TRITON_INTERPRET=1 (numpy, NOT a speed): L=96, 4/1 heads, D=16, N=8 S=1 W=2: "
          f"fwd+bwd {took:.2f} s; forward max |diff| vs reference {err:.1e}")


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8192,32768,131072" if gpu else "1024,2048", help="text tokens n")
    ap.add_argument("--heads", type=int, default=32 if gpu else 4)
    ap.add_argument("--kv-heads", type=int, default=8 if gpu else 1)
    ap.add_argument("--head-dim", type=int, default=PROD["head_dim"])
    ap.add_argument("--chunk", type=int, default=PROD["chunk"])
    ap.add_argument("--summaries", type=int, default=PROD["summaries"])
    ap.add_argument("--window", type=int, default=PROD["window"])
    ap.add_argument("--repeats", type=int, default=5 if gpu else 3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {where}, torch {torch.__version__}, {dtype}, batch 1, {args.heads}/{args.kv_heads} heads, "
          f"head_dim {args.head_dim}, N={args.chunk} S={args.summaries} W={args.window}")
    rows = []
    for n in sizes:
        res = bench_size(n, args, device, dtype, sync)
        rows.append((n, res))
        print(f"  n={n}: " + ", ".join(f"{k} {'OOM' if t is None else f'{t * 1e3:.1f} ms'} ({w})"
                                       for k, (t, w) in res.items()))
    names = list(rows[0][1])
    print(f"\nAttention time (ms) and speed-up over dense causal SDPA ({'fwd+bwd' if gpu else 'see column'})")
    print(f"{'n text':>8} {'L':>8} " + " ".join(f"{k + ' (' + rows[0][1][k][1] + ')':>24}" for k in names))
    for n, res in rows:
        cells = []
        for k in names:
            t, what = res[k]
            base = res["dense fwd" if what.startswith("fwd") and not what.startswith("fwd+") else "dense"][0]
            cells.append("OOM" if t is None else f"{t * 1e3:.1f} ({base / t:.2f}x)" if base else f"{t * 1e3:.1f}")
        print(f"{n:>8} {expanded_length(n, args.chunk, args.summaries):>8} " + " ".join(f"{c:>24}" for c in cells))
    if not gpu:
        triton_interpreter_demo()
    tile_report(sorted(set(sizes) | {8192, 32768, 131072}))
    kv_cache_report()


if __name__ == "__main__":
    main()
