"""GRPO on reasoning-gym basic_arithmetic with the real SmolLM2-135M-Instruct (CPU, bounded).

    OMP_NUM_THREADS=1 python bench/rl_grpo_arithmetic.py --minutes 18 --steps 40 --eval-every 4

Runs `keel rl recipes/rl/grpo-tiny.yaml` step by step until the time budget is spent and prints the
held-out greedy accuracy curve (eval every --eval-every steps, 64 held-out prompts) and the
training reward per step, from the run's metrics.jsonl.
"""
import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--out", default="/tmp/keel-bench-grpo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import keel
    from keel.rl.grpo import GRPOTrainer

    cfg = keel.load_recipe(REPO / "recipes" / "rl" / "grpo-tiny.yaml",
                           [f"run.out_dir={args.out}", "checkpoint.resume=never", "logging.wandb=disabled",
                            f"rl.steps={args.steps}", f"rl.eval_every={args.eval_every}", *args.overrides])
    trainer = GRPOTrainer(cfg)
    deadline = time.perf_counter() + args.minutes * 60
    baseline = trainer.evaluate()
    trainer.metrics.log(0, baseline)
    print(f"step 0: held-out greedy accuracy {baseline['eval_accuracy']:.3f}", flush=True)
    while trainer.step < cfg.rl.steps and time.perf_counter() < deadline:
        row = trainer.train_step()
        trainer.step += 1
        if trainer.step % args.eval_every == 0:
            row.update(trainer.evaluate())
        trainer.metrics.log(trainer.step, row)
        print(f"step {trainer.step}: train reward {row['reward/mean']:.3f} len {row['rollout/response_len_mean']:.1f}"
              + (f" | held-out accuracy {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else ""), flush=True)
    if "eval_accuracy" not in row:
        row = trainer.evaluate()
        trainer.metrics.log(trainer.step, row)
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], round(r["eval_accuracy"], 3)) for r in rows if "eval_accuracy" in r]
    print("held-out greedy accuracy (step, accuracy):", curve)


if __name__ == "__main__":
    main()
