"""GRPO step time on one process vs FSDP2 over N ranks (CPU/gloo, or GPUs), the same recipe and seed.

    python bench/rl_grpo_ranks.py --steps 4 --nproc 2

Runs `keel rl recipes/rl/grpo-tiny.yaml` (real SmolLM2-135M-Instruct, reasoning-gym arithmetic)
once on one process and once under torchrun with --nproc ranks, then prints side by side the mean
step, rollout and update seconds over the steps after the first (the first warms caches), and
through which step both runs logged the same rewards (the rollouts do not depend on the ranks, up
to rounding: in fp32 the first steps match exactly, in bf16 the rollouts differ from the start).
On a CPU box the ranks share its cores: one process uses them all as intra-op threads, each rank
gets cores / nproc.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "rl" / "grpo-tiny.yaml"


def run(out: Path, nproc: int, steps: int, threads: int, overrides: list[str]) -> list[dict]:
    args = [RECIPE.as_posix(), f"run.out_dir={out}", "checkpoint.resume=never", "logging.wandb=disabled",
            "logging.progress=false", f"rl.steps={steps}", "rl.eval_prompts=null", *overrides]
    launch = [sys.executable, "-m", "keel", "rl"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "keel", "rl"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launch + args, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--out", default="/tmp/keel-bench-grpo-ranks")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    one = run(out / "one", 1, args.steps, args.cores, args.overrides)
    many = run(out / f"ranks{args.nproc}", args.nproc, args.steps, max(args.cores // args.nproc, 1), args.overrides)
    one_t, many_t = [r for r in one if "loss" in r][1:], [r for r in many if "loss" in r][1:]
    print(f"GRPO grpo-tiny (SmolLM2-135M, {args.steps} steps, means over steps 2..{args.steps}), {args.cores} cores")
    print(f"{'':24}{'1 process':>12}{f'{args.nproc} ranks':>12}{'ratio':>8}")
    for key in ("step_time_s", "rollout/time_s", "train_time_s"):
        a, b = mean(one_t, key), mean(many_t, key)
        print(f"{key:24}{a:12.2f}{b:12.2f}{a / b:8.2f}x")
    # Equal rollouts need equal numerics: in bf16 a GEMM's result depends on the batch's shape (each
    # rank batches only its share of the prompts), and in fp32 the ranks' gradient sums round in
    # another order, which after a few updates can flip a sampled token (the tests use top_k 20 to
    # keep draws away from such ties).
    rewards = [([r["reward/mean"] for r in rows if "loss" in r]) for rows in (one, many)]
    equal = next((i for i, (a, b) in enumerate(zip(*rewards)) if a != b), len(rewards[0]))
    print(f"rewards equal through step {equal} of {len(rewards[0])}")


if __name__ == "__main__":
    main()
