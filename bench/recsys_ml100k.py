"""OneRec-V2, S²GR and their baselines on the real MovieLens-100K, on the same leave-one-out split.

    python bench/recsys_ml100k.py                       # 3 seeds, every model (about an hour on 2 cores)
    python bench/recsys_ml100k.py --seeds 1 --models lazy sasrec --steps 300     # a quick look
    python bench/recsys_ml100k.py --seeds 3 --models tiger s2gr                  # S²GR vs TIGER

Per model and seed: `keel train` of its recipe (train.seed = the seed), then the TEST split scored
in-process: HR@{10,20} and NDCG@{10,20} over all 1,682 items, each user's known items masked. The
lazy decoder and SASRec rank every item exactly; the other generative architectures rank by a
constrained beam search (--beam; exact scoring of the naive decoder runs the 50-item context once per
candidate SID prefix, far beyond a CPU's budget). Popularity and first-order Markov are fitted on the
training interactions (deterministic: the same for every seed). Per seed a bootstrap interval over
users; over seeds the mean with a 95% Student-t interval. Training FLOPs per sample are measured with
torch's FLOP counter on each built model and a real batch, and the three architectures are compared
again at OneRec-V2's 1B shape with a 512-item context (on the meta device: no memory, no compute).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keel  # noqa: E402
from keel.model.rec_baselines import MarkovScorer, PopularityScorer  # noqa: E402
from keel.model.rec_task import sid_table_path  # noqa: E402
from keel.model.rec_eval import bootstrap_ci, evaluate_scorer, seeds_summary  # noqa: E402
from keel.model.rec_flops import compare_architectures, training_flops_per_sample  # noqa: E402
from keel.model.registry import get_model_spec  # noqa: E402

ONEREC, SASREC = "recipes/recsys/onerec-tiny.yaml", "recipes/recsys/sasrec-tiny.yaml"
# name -> (recipe, overrides, exact full ranking)
MODELS = {
    "sasrec": (SASREC, [], True),
    "lazy": (ONEREC, [], True),
    "lazy_moe": ("recipes/recsys/onerec-moe-tiny.yaml", [], False),
    "encoder_decoder": (ONEREC, ["model.architecture=encoder_decoder", "model.g_kv=0", "model.encoder_layers=2",
                                 "recsys.eval_beam=32"], False),
    "naive": (ONEREC, ["model.architecture=naive_decoder", "model.g_kv=0", "recsys.eval_beam=32"], False),
    "tiger": ("recipes/recsys/tiger-tiny.yaml", [], False),  # RQ-VAE IDs, encoder-decoder
    "s2gr": ("recipes/recsys/s2gr-tiny.yaml", [], False),  # CoBa RQ-VAE IDs, the same + latent thoughts
}
METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")
SHOWN = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "unmasked hr@10", "unmasked ndcg@10")


def train(name: str, seed: int, out: Path, steps: int | None) -> float:
    recipe, overrides, _ = MODELS[name]
    args = [sys.executable, "-m", "keel", "train", recipe, *overrides, f"run.out_dir={out}", f"train.seed={seed}",
            "logging.wandb=disabled", "logging.progress=false", "checkpoint.every=0", "train.eval_every=0"]
    if steps:
        args.append(f"train.steps={steps}")
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def test_metrics(run: Path, exact: bool, beam: int) -> tuple[dict, dict, float]:
    """Per-user test metrics of a trained run (history masked, and not), and its training FLOPs per
    sample on a real batch."""
    cfg = keel.load_recipe(run / "config.yaml")
    cfg.recsys.eval_beam = 0 if exact else beam
    task = get_model_spec(cfg.model.name).task(cfg)
    task.prepare()
    model = keel.load(run)
    data = task.build_data(dp_rank=0, dp_size=1)
    masked, unmasked = score_both(lambda b: task.item_scores(model, task.with_inputs(b)), data, task.split)
    sample = data.next_step()[0]
    with torch.enable_grad():
        flops = training_flops_per_sample(model.requires_grad_(True), task.with_inputs(sample))
    return masked, unmasked, flops


def score_both(score_fn, data, split) -> tuple[dict, dict]:
    """Per-user metrics on the test split with the user's known items masked and unmasked, from one
    scoring of every batch (exact scoring of a generative model is the expensive part)."""
    cache: dict = {}

    def cached(batch):
        key = id(batch)
        if key not in cache:
            cache[key] = score_fn(batch)
        return cache[key]

    batches = data.split_batches("test", 128, 0, 1)
    masked = evaluate_scorer(cached, batches, topk=(10, 20), history=split.history("test"))
    unmasked = evaluate_scorer(cached, batches, topk=(10, 20))
    return masked, unmasked


def baselines(cfg) -> dict:
    task = get_model_spec("sasrec").task(cfg)  # any recommendation task: the split and batches
    task.prepare()
    data = task.build_data(dp_rank=0, dp_size=1)
    return {name: score_both(scorer, data, task.split)
            for name, scorer in (("popularity", PopularityScorer.from_split(task.split)),
                                 ("markov", MarkovScorer.from_split(task.split)))}


def summarise(rows: list[dict]) -> dict:
    return {"seeds": rows, "train_s": float(np.mean([r["train_s"] for r in rows])),
            "flops": float(np.mean([r["flops"] for r in rows]))}


def cells(masked: dict, unmasked: dict, seed: int) -> dict:
    """(mean, bootstrap low, high) per metric, history masked and (prefixed) unmasked."""
    out = {m: bootstrap_ci(masked[m], seed=seed) for m in METRICS}
    out.update({f"unmasked {m}": bootstrap_ci(unmasked[m], seed=seed) for m in METRICS})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (to add a seed to an earlier run)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None, help="override train.steps of every recipe")
    p.add_argument("--beam", type=int, default=64, help="beam width where ranking is not exact")
    p.add_argument("--out", default="runs/bench-recsys", help="run directories and results.json")
    args = p.parse_args()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    for recipe in dict.fromkeys([ONEREC] + [MODELS[name][0] for name in args.models]):
        if not sid_table_path(keel.load_recipe(REPO / recipe).recsys).is_file():  # built once per setting
            subprocess.run([sys.executable, "-m", "keel", "sid", "build", recipe], cwd=REPO, check=True)
    results: dict = {}
    for name, (masked, unmasked) in baselines(keel.load_recipe(REPO / SASREC)).items():
        results[name] = summarise([{"train_s": 0.0, "flops": 0.0, **cells(masked, unmasked, 0)}])
    for name in args.models:
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run = out / f"{name}-seed{seed}"
            done = (run / "train_seconds.txt")
            if not done.exists():  # a rerun of the bench scores finished runs again without training
                seconds = train(name, seed, run, args.steps)
                done.write_text(str(seconds))
            seconds = float(done.read_text())
            masked, unmasked, flops = test_metrics(run, MODELS[name][2], args.beam)
            rows.append({"train_s": seconds, "flops": flops, **cells(masked, unmasked, seed)})
            print(f"{name} seed {seed}: train {seconds:.0f} s, NDCG@10 {rows[-1]['ndcg@10'][0]:.4f}, "
                  f"HR@10 {rows[-1]['hr@10'][0]:.4f} (unmasked NDCG@10 {rows[-1]['unmasked ndcg@10'][0]:.4f}), "
                  f"{flops / 1e6:.2f} MFLOPs/sample", flush=True)
        results[name] = summarise(rows)
    shape = compare_architectures("1B", context_len=512)
    # Models not benched in this invocation keep their earlier results (a bench of a few models at a
    # time must not erase the others').
    path = out / "results.json"
    earlier = json.loads(path.read_text())["models"] if path.is_file() else {}
    path.write_text(json.dumps({"models": {**earlier, **results}, "flops_1b_ctx512": shape}, indent=1))
    print_tables(results, shape, args)


def print_tables(results: dict, shape: dict, args) -> None:
    print(f"\nML-100K test split, 943 users, full ranking of 1,682 items, history masked; "
          f"{args.seeds} seed(s); mean [95% interval]")
    print("| model | " + " | ".join(m.upper().replace("UNMASKED", "unmasked") for m in SHOWN)
          + " | train s | MFLOPs/sample (train) |")
    print("|---" * (len(SHOWN) + 3) + "|")
    for name, r in results.items():
        cells = []
        for m in SHOWN:
            means = [s[m][0] for s in r["seeds"]]
            if len(means) > 1:
                summary = seeds_summary(means)
                cells.append(f"{summary['mean']:.4f} [{summary['low']:.4f}, {summary['high']:.4f}]")
            else:
                mean, lo, hi = r["seeds"][0][m]
                cells.append(f"{mean:.4f} [{lo:.4f}, {hi:.4f}] (bootstrap)")
        flops = f"{r['flops'] / 1e6:.2f}" if r["flops"] else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {r['train_s']:.0f} | {flops} |")
    lazy = shape["lazy_decoder"]["train"]
    print("\nOneRec-V2 1B shape (d 1792, 18 layers, 14 heads), context 512, one target, training GFLOPs/sample:")
    for arch, row in shape.items():
        print(f"  {arch:16s} {row['train'] / 1e9:8.1f}  ({row['train'] / lazy:5.1f}x lazy; formula "
              f"{row['formula_train'] / 1e9:.1f}; {row['params'] / 1e9:.2f} B params)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
