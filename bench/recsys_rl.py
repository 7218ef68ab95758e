"""OneRec-V2 recommender RL on the real MovieLens-100K: the SFT policy vs + GBPO vs + ECPO, with the
RSFT-only control, over seeds.

    OMP_NUM_THREADS=1 python bench/recsys_rl.py --seeds 3 [--sft-steps 300] [--rl-steps 30]

Per seed: an SFT policy (`keel train recipes/recsys/onerec-tiny.yaml train.steps=SFT_STEPS`), then
`keel rl recipes/recsys/onerec-v2-rl-tiny.yaml` from it with GBPO (the recipe), with ECPO
(`rl.loss=ecpo`: early-clipped GRPO, epsilon 0.2, delta 0.1) and with the RL term off
(`rl.rec.rl_weight=0`: RSFT alone, what RL is measured against). Every run trains RSFT beside RL, as
OneRec does. Reported after the last step, mean and 95% Student-t interval over seeds: eval_reward
(the mean logged-feedback reward per recommended item over the beams of 256 fixed training samples,
unknown = 0) and validation HR@10 / NDCG@10 (943 users); the SFT row is each RL run's step-0 eval.
Runs go to runs/bench-rec-rl/ and are reused when present (delete them to re-measure).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from keel.model.rec_eval import seeds_summary  # noqa: E402

# row name -> (run folder prefix, overrides of the recipe)
VARIANTS = {"+ GBPO": ("gbpo", []), "+ ECPO": ("ecpo", ["rl.loss=ecpo"]),
            "RSFT alone (control)": ("rsft", ["rl.rec.rl_weight=0"])}
METRICS = ("eval_reward", "eval_hr@10", "eval_ndcg@10")


def keel(*args) -> float:
    """Run `keel ARGS`; its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "keel", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"keel {' '.join(map(str, args[:2]))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def evals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_reward" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--rl-steps", type=int, default=30)
    args = ap.parse_args()
    root = REPO / "runs" / "bench-rec-rl"
    final: dict = {name: [] for name in ("SFT policy", *VARIANTS)}
    for seed in range(args.seeds):
        sft = root / f"sft-seed{seed}"
        if not (sft / "metrics.jsonl").exists():
            seconds = keel("train", REPO / "recipes/recsys/onerec-tiny.yaml", f"run.out_dir={sft}", f"train.seed={seed}",
                           f"train.steps={args.sft_steps}", "logging.wandb=disabled", "logging.progress=false")
            print(f"seed {seed}: SFT policy trained in {seconds:.0f} s", flush=True)
        for name, (slug, overrides) in VARIANTS.items():
            run = root / f"{slug}-seed{seed}"
            if not (run / "metrics.jsonl").exists() or len(evals(run)) < 2:
                seconds = keel("rl", REPO / "recipes/recsys/onerec-v2-rl-tiny.yaml", f"rl.policy={sft}",
                               f"run.out_dir={run}", f"train.seed={seed}", f"rl.steps={args.rl_steps}",
                               f"rl.eval_every={args.rl_steps}", "checkpoint.resume=never", "logging.wandb=disabled",
                               "logging.progress=false", *overrides)
                print(f"seed {seed}: {name} in {seconds:.0f} s", flush=True)
            rows = evals(run)
            if name == "+ GBPO":
                final["SFT policy"].append(rows[0])
            final[name].append(rows[-1])
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {rows[0][k]:.4f} -> {rows[-1][k]:.4f}" for k in METRICS),
                  flush=True)
    print(f"\n{args.seeds} seeds, {args.rl_steps} RL steps from a {args.sft_steps}-step SFT policy; mean [95% interval]")
    print("| run | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, rows in final.items():
        cells = []
        for key in METRICS:
            s = seeds_summary(r[key] for r in rows)
            cells.append(f"{s['mean']:.4f} [{s['low']:.4f}, {s['high']:.4f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
