"""MoE feed-forward fwd+bwd time: keel's grouped GEMM vs a per-expert loop, and vs a dense SwiGLU
FFN of the same active FLOPs (width top_k * expert_dim).

    OMP_NUM_THREADS=2 python bench/moe_layer.py --tokens 4096 --dim 512 --experts 16 --top-k 2 --expert-dim 256

Three expert paths inside the same MoEFeedForward (same routing, weights and tokens):
  grouped_mm   tokens sorted by expert, one torch._grouped_mm per projection (keel's default)
  sorted_loop  tokens sorted by expert, one matmul per expert (keel's `expert_compute: loop` reference)
  masked_loop  per expert, find its tokens with a mask over all tokens, compute, index_add (the
               transformers-style loop: no sort)
Reported: median ms per fwd+bwd over --iters runs, after --warmup; the dense ratio is MoE / dense.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from keel.model.moe import MoEConfig, MoEFeedForward, SharedExperts


def masked_loop_forward(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    _, _, chosen, weights = layer.route(tokens)
    e, out = layer.experts, torch.zeros_like(tokens)
    for j in range(layer.cfg.n_experts):
        token_idx, slot = torch.where(chosen == j)
        if token_idx.numel() == 0:
            continue
        h = tokens[token_idx]
        y = F.linear(F.silu(F.linear(h, e.w1[j])) * F.linear(h, e.w3[j]), e.w2[j])
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    return out.view_as(x)


def time_fwd_bwd(fn, x, warmup: int, iters: int) -> float:
    times = []
    for i in range(warmup + iters):
        x.grad = None
        t0 = time.perf_counter()
        fn(x).pow(2).mean().backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim, requires_grad=True)
    results = {}
    for compute in ("grouped_mm", "loop"):
        cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k, expert_dim=args.expert_dim, expert_compute=compute)
        layer = MoEFeedForward(args.dim, args.expert_dim, cfg)
        torch.manual_seed(1)
        layer.init_weights(0.02, 0.02)
        results["grouped_mm" if compute == "grouped_mm" else "sorted_loop"] = time_fwd_bwd(layer, x, args.warmup,
                                                                                           args.iters)
    results["masked_loop"] = time_fwd_bwd(lambda t: masked_loop_forward(layer, t), x, args.warmup, args.iters)
    dense = SharedExperts(args.dim, args.top_k * args.expert_dim)  # a plain SwiGLU of the active width
    results["dense_same_active_flops"] = time_fwd_bwd(dense, x, args.warmup, args.iters)
    print(f"tokens {args.tokens}, dim {args.dim}, {args.experts} experts top-{args.top_k} of width {args.expert_dim}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| path | fwd+bwd ms (median) | / dense |")
    print("|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / results['dense_same_active_flops']:.2f} |")


if __name__ == "__main__":
    main()
