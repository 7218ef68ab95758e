"""The reward model of recommender RL on the real MovieLens-100K, side by side with what a user would
use instead: the ranker (recipes/recsys/ranker-tiny.yaml) against popularity (engagement) and the
item's / user's average rating (like), on the validation users; then GBPO + RSFT against it
(recipes/recsys/onerec-v2-rl-rm-tiny.yaml) from a trained OneRec-V2 run, reporting the reward-model
reward and HR@10 before and after.

    python bench/recsys_reward_model.py --policy runs/onerec-tiny [--seeds 3] [--rl-steps 100]

Runs go to runs/bench-reward-model/ and are reused when present (delete them to re-measure).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def keel(*args):
    subprocess.run([sys.executable, "-m", "keel", *map(str, args)], cwd=REPO, check=True)


def metrics(run):
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def baselines(task, cfg):
    """(popularity AUC of engagement, item-mean and user+item-mean AUC of like) on the trainer's
    eval batches, by the definitions of keel/model/ranker_task.py."""
    from keel.data.recsys import build_rec_data
    s = task.split
    train = np.zeros(len(s.items), bool)
    for u in range(1, len(s.ptr) - 1):
        train[s.ptr[u]:s.train_end[u]] = True
    items, ratings = s.items[train], s.ratings[train].astype(float)
    users = np.repeat(np.arange(len(s.ptr) - 1), np.diff(s.ptr))[train]
    n = task.log.n_items + 1
    popularity = np.bincount(items, minlength=n)
    item_mean = np.bincount(items, ratings, minlength=n) / np.maximum(popularity, 1)
    user_mean = np.bincount(users, ratings, minlength=len(s.ptr)) / np.maximum(np.bincount(users, minlength=len(s.ptr)), 1)
    data = build_rec_data(task.rec, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                          dp_rank=0, dp_size=1, seed=cfg.train.seed)
    pop, like = [], {"item": [0.0, 0], "user+item": [0.0, 0]}
    for batch in data.eval_batches(cfg.train.eval_batches, cfg.train.micro_batch, 0, 1):
        inputs = task.with_inputs(batch)
        real = (batch["targets"][:, 0] != 0).numpy()
        score = popularity[inputs["candidates"].numpy()]
        pop += list((((score[:, :1] > score[:, 1:]) + 0.5 * (score[:, :1] == score[:, 1:])).mean(1))[real])
        liked = (batch["target_ratings"][:, 0] >= cfg.model.like_rating).numpy() & real
        other = ~liked & real
        target, user = batch["targets"][:, 0].numpy(), batch["user"].numpy()
        for name, s_ in (("item", item_mean[target]), ("user+item", item_mean[target] + user_mean[user])):
            a, b = s_[liked][:, None], s_[other][None, :]
            like[name][0] += float(((a > b) + 0.5 * (a == b)).sum())
            like[name][1] += a.size * b.size
    return float(np.mean(pop)), {k: v[0] / v[1] for k, v in like.items()}


def main():
    import keel as keel_api
    from keel.model.registry import get_model_spec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="a keel run of recipes/recsys/onerec-tiny.yaml")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--rl-steps", type=int, default=100)
    args = ap.parse_args()
    root = REPO / "runs" / "bench-reward-model"
    print("| seed | ranker AUC engage | popularity | ranker AUC like | item mean | user+item mean | "
          "RM reward before -> after RL | HR@10 before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        ranker = root / f"ranker-seed{seed}"
        if not (ranker / "metrics.jsonl").exists():
            keel("train", REPO / "recipes/recsys/ranker-tiny.yaml", f"run.out_dir={ranker}", f"train.seed={seed}",
                 "logging.wandb=disabled")
        final = [r for r in metrics(ranker) if "eval_auc_engagement" in r][-1]
        cfg = keel_api.load_recipe(ranker / "config.yaml")
        task = get_model_spec("ranker").task(cfg)
        task.prepare()
        with torch.no_grad():
            pop_auc, like_auc = baselines(task, cfg)
        rl = root / f"rl-seed{seed}"
        if not (rl / "metrics.jsonl").exists():
            keel("rl", REPO / "recipes/recsys/onerec-v2-rl-rm-tiny.yaml", f"rl.policy={args.policy}",
                 f"rl.rec.reward_cfg.reward_model.path={ranker}", f"run.out_dir={rl}", f"train.seed={seed}",
                 f"rl.steps={args.rl_steps}", "logging.wandb=disabled")
        evals = [r for r in metrics(rl) if "eval_reward" in r]
        print(f"| {seed} | {final['eval_auc_engagement']:.4f} | {pop_auc:.4f} | {final['eval_auc_like']:.4f} | "
              f"{like_auc['item']:.4f} | {like_auc['user+item']:.4f} | {evals[0]['eval_reward']:.4f} -> "
              f"{evals[-1]['eval_reward']:.4f} | {evals[0]['eval_hr@10']:.4f} -> {evals[-1]['eval_hr@10']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
