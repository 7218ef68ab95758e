"""The real SmolLM2-135M continually pretrained into KSA on the KJV, against the dense original.

    OMP_NUM_THREADS=2 python bench/ksa_cpt.py --work runs/ksa_cpt
    ... python bench/ksa_cpt.py --stage1-steps 2 --stage2-steps 1 --windows 1 --trials 1   # smoke run

Steps: `keel import hf smollm2` into a scratch folder; stage 1 (recipes/ksa/smollm2-ksa-stage1.yaml:
self-distillation, only summary parameters train) and stage 2 (smollm2-ksa-stage2.yaml: anneal all
parameters) through keel's Trainer; then, for the dense SmolLM2, the KSA model before any training
(summary parameters copied from the dense ones), after stage 1 and after stage 2:

  * held-out perplexity on the KJV documents the recipes hold out (Jude, Revelation) at a context of
    `--context` text tokens (default 512 = 8x the 64-token KSA window W*N), over all tokens and over
    the tokens whose own chunk is more than W chunks into the window (text index >= (W+1)*N), the
    ones that see older text only through summaries in KSA layers;
  * passkey retrieval: "The secret number is NNNNN." at the start, then `--filler` tokens of held-out
    KJV text, then "What was the secret number? The secret number is"; greedy decoding (the KSA decode cache for
    KSA models, keel's KV cache for the dense one) must reproduce the number. Accuracy over `--trials`.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGE1 = REPO / "recipes" / "ksa" / "smollm2-ksa-stage1.yaml"
STAGE2 = REPO / "recipes" / "ksa" / "smollm2-ksa-stage2.yaml"
QUIET = ["logging.wandb=disabled", "logging.progress=false", "train.sample_tokens=0", "checkpoint.every=0"]


def heldout_windows(cfg, context: int, count: int) -> list[dict]:
    """`count` windows of `context` tokens, evenly spread over the recipe's held-out KJV documents."""
    from keel.data.assets import keel_home
    from keel.data.loader import build_train_data
    from keel.data.tokenizer import Tokenizer

    cfg.data.seq_len = context
    data = build_train_data(cfg.data, Tokenizer.load(cfg.data.tokenizer), global_batch=1, micro_batch=1,
                            dp_rank=0, dp_size=1, seed=0, cache_dir=keel_home() / "data", progress=False)
    return data.eval_batches(count, 1, 0, 1)


@torch.no_grad()
def perplexity(model, windows: list[dict], first_far: int) -> tuple[float, float]:
    """(ppl over all tokens, ppl over text indices >= first_far) of `model` on the windows."""
    totals = torch.zeros(2, dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)
    for w in windows:
        logits = model(w["input_ids"], positions=w["positions"], doc_ids=w["doc_ids"]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), w["labels"].flatten(), reduction="none")
        totals += torch.stack([nll.sum(), nll[first_far:].sum()]).double()
        counts += torch.tensor([nll.numel(), nll[first_far:].numel()], dtype=torch.float64)
    return tuple(math.exp(t / c) for t, c in zip(totals.tolist(), counts.tolist()))


def passkey_trials(tokenizer, n: int, filler_tokens: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs: the key, then held-out KJV filler, then the question."""
    from keel.data.assets import corpus_files
    verses = corpus_files("kjv")[-1].read_text().splitlines()  # Revelation: held out by the recipes
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        key = rng.randint(10000, 99999)
        start = rng.randrange(len(verses) // 2)
        filler, i = [], start
        while len(tokenizer.encode(" ".join(filler))) < filler_tokens:
            filler.append(verses[i % len(verses)])
            i += 1
        filler_ids = tokenizer.encode(" ".join(filler))[:filler_tokens]
        head = tokenizer.encode(f"The secret number is {key}.\n")
        tail = tokenizer.encode("\nWhat was the secret number? The secret number is")
        trials.append((head + filler_ids + tail, tokenizer.encode(f" {key}")))
    return trials


def passkey_accuracy(model, trials) -> float:
    hits = 0
    for prompt, answer in trials:
        out = model.generate([prompt], max_new_tokens=len(answer))  # greedy
        hits += out.tokens[0] == answer
    return hits / len(trials)


def ksa_before_training(cfg, dense_ckpt: Path):
    """The KSA model exactly as stage 1 starts: the Trainer's seed, then the dense weights, with the
    summary parameters initialised from them (KSATransformer.init_missing_weights)."""
    from keel.model.registry import build_model
    from keel.checkpoint.dcp import load_model_weights

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, "meta")
    model.to_empty(device="cpu")
    model.init_buffers()
    load_model_weights(dense_ckpt, model)
    return model.eval()


def train_stage(recipe: Path, out_dir: Path, init_from: Path, steps: int, batch: int) -> dict:
    """One stage through keel's Trainer; a finished stage in `out_dir` is resumed at its end (not rerun)."""
    import keel
    from keel.train.trainer import Trainer

    cfg = keel.load_recipe(recipe, QUIET + [f"run.out_dir={out_dir}", f"model.init_from={init_from}",
                                            f"train.steps={steps}", "train.eval_every=0",
                                            f"train.micro_batch={batch}", f"train.global_batch={batch}"])
    t0 = time.perf_counter()
    summary = Trainer(cfg).train()
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1-steps", type=int, default=30)
    p.add_argument("--stage2-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2, help="sequences (of the recipes' 256 tokens) per step")
    p.add_argument("--context", type=int, default=512, help="eval context in text tokens")
    p.add_argument("--windows", type=int, default=6, help="held-out windows for perplexity")
    p.add_argument("--trials", type=int, default=8, help="passkey trials")
    p.add_argument("--filler", type=int, default=280, help="filler tokens between key and question")
    p.add_argument("--work", default=None, help="scratch folder, kept (a rerun reuses finished stages); "
                                                "default: a temporary one, removed")
    args = p.parse_args()

    import keel
    from keel.data.tokenizer import Tokenizer
    from keel.checkpoint.hf import import_hf

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(args.work or tempfile.mkdtemp(prefix="ksa_cpt_"))
    t_start = time.perf_counter()
    try:
        dense_ckpt = work / "smollm2"
        if not (dense_ckpt / "checkpoints" / "step_0").is_dir():
            import_hf("smollm2", dense_ckpt)
        s1 = train_stage(STAGE1, work / "stage1", dense_ckpt, args.stage1_steps, args.batch)
        print(f"stage 1: {args.stage1_steps} steps, loss {s1['loss']:.3f}, eval CE {s1['eval_loss']:.3f}, "
              f"{s1['wall_s']:.0f} s", flush=True)
        s2 = train_stage(STAGE2, work / "stage2", work / "stage1", args.stage2_steps, args.batch)
        print(f"stage 2: {args.stage2_steps} steps, loss {s2['loss']:.3f}, eval CE {s2['eval_loss']:.3f}, "
              f"{s2['wall_s']:.0f} s", flush=True)

        cfg = keel.load_recipe(STAGE1, [f"model.init_from={dense_ckpt}"])
        m = cfg.model
        window = m.window_chunks * m.chunk_size
        first_far = (m.window_chunks + 1) * m.chunk_size
        windows = heldout_windows(cfg, args.context, args.windows)
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
        trials = passkey_trials(tokenizer, args.trials, args.filler, seed=0)
        prompt_len = sum(len(t[0]) for t in trials) / len(trials)
        models = {"dense SmolLM2-135M": lambda: keel.load(dense_ckpt),
                  "KSA, before CPT": lambda: ksa_before_training(cfg, dense_ckpt),
                  f"KSA, stage 1 ({args.stage1_steps} steps)": lambda: keel.load(work / "stage1"),
                  f"KSA, + stage 2 ({args.stage2_steps} steps)": lambda: keel.load(work / "stage2")}
        print(f"\nKSA N={m.chunk_size} S={m.summary_tokens} W={m.window_chunks} (window {window} text tokens), "
              f"layers {m.layer_pattern} tiled over {m.n_layers}; held-out KJV, context {args.context} "
              f"({args.windows} windows); passkey: {args.trials} trials, prompts of {prompt_len:.0f} tokens, "
              f"key {args.filler}+ tokens before the question")
        print(f"{'model':32s} {'ppl (all)':>10s} {'ppl (idx>=' + str(first_far) + ')':>15s} {'passkey':>8s}")
        for name, load in models.items():
            model = load()
            ppl_all, ppl_far = perplexity(model, windows, first_far)
            acc = passkey_accuracy(model, trials)
            print(f"{name:32s} {ppl_all:10.2f} {ppl_far:15.2f} {acc:8.0%}", flush=True)
            del model
        print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
