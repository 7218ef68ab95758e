"""Kelix's tiny chain on the real Fashion-MNIST, measured the way the method is judged:

- understanding: class accuracy of the unified model on test images (the caption "a <name>" it finds
  likeliest), beside an independent CNN classifier trained here on the same training images;
- generation: the share of generated images (prompt "a <class>", temperature 1) that the independent
  classifier recognises as the prompted class;
- the tokenizer: per-sub-codebook usage and perplexity, reconstruction MSE against the mean-image
  baseline; with --capacity, n_q x K against 1 x (n_q*K) codes at equal vocabulary (tokenizer stage);
- throughput: target sub-tokens per second of each stage on this machine.

    OMP_NUM_THREADS=2 python bench/kelix_tiny.py [--per-class 20] [--test-images 2000] [--capacity]

Runs go to runs/bench-kelix/ and are reused when present (delete them to re-measure).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "runs" / "bench-kelix"


def train_stage(name: str, recipe: str, init_from: Path | None, *extra) -> Path:
    out = ROOT / name
    if not (out / "checkpoints").is_dir():
        args = [sys.executable, "-m", "keel", "train", f"recipes/kelix/{recipe}", f"run.out_dir={out}",
                f"model.init_from={init_from or 'null'}", "logging.progress=false", "logging.wandb=disabled", *extra]
        subprocess.run(args, cwd=REPO, check=True)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def classifier(epochs: int = 2, seed: int = 0) -> nn.Module:
    """A small CNN on all 60,000 training images: the independent judge of generated images."""
    from keel.data.fashion_mnist import load_fashion_mnist

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))
    images, labels = load_fashion_mnist("train")
    x = images.float()[:, None] / 255.0
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def understanding(model, test_images: int) -> float:
    """eval_class_acc of the unified model over `test_images` test images (spread over the split)."""
    import keel
    from keel.model.kelix_task import KelixTask

    run = ROOT / "2-unified"
    cfg = keel.load_recipe(run / "config.yaml", [f"images.eval_images={test_images}"])
    task = KelixTask(cfg)
    task.prepare()
    data = task.dataset("test", fixed_caption=True)
    hits = 0
    for start in range(0, len(data), 64):
        from keel.data.loader import collate
        batch = collate([data[i] for i in range(start, min(start + 64, len(data)))])
        hits += int((model(batch, what="eval")["class_scores"].argmax(-1) == batch["labels"]).sum())
    return hits / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=20, help="generated images per class")
    parser.add_argument("--test-images", type=int, default=2000, help="test images for understanding accuracy")
    parser.add_argument("--capacity", action="store_true", help="also train 1 x (n_q*K) tokenizers to compare")
    args = parser.parse_args()

    import keel
    from keel.cli.kelix import generate_images
    from keel.data.fashion_mnist import CLASS_NAMES, captions_for, load_fashion_mnist
    from keel.model.kelix_vocab import CaptionVocab

    start = time.time()
    tok = train_stage("1-tokenizer", "tiny-1-tokenizer.yaml", None)
    uni = train_stage("2-unified", "tiny-2-unified.yaml", tok)
    det = train_stage("3-detokenizer", "tiny-3-detokenizer.yaml", uni)
    print(f"stages trained or reused in {time.time() - start:.0f} s")
    for run in (tok, uni, det):
        rows = metrics(run)
        rate = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        final = [r for r in rows if "eval_loss" in r][-1]
        print(f"{run.name:>14}: {rate[-1]:,.0f} subtok/s | " + ", ".join(
            f"{k} {v:.4f}" for k, v in final.items() if k.startswith("eval_")))

    test, test_labels = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    mean = train.float().mean(0) / 255.0
    print(f"mean-image baseline MSE on the test split: {float(((test.float() / 255.0 - mean) ** 2).mean()):.4f}")

    net = classifier()
    x_test = test.float()[:, None] / 255.0
    print(f"independent CNN: test accuracy {accuracy(net, x_test, test_labels):.3f} (the judge of generated images)")

    model = keel.load(det)
    print(f"understanding (unified model, {args.test_images} test images): class accuracy "
          f"{understanding(model, args.test_images):.3f} (chance 0.100)")

    vocab = CaptionVocab.from_templates()
    recognised = []
    for label, name in enumerate(CLASS_NAMES):
        images = generate_images(model, vocab.encode(captions_for(label)[0]), args.per_class, 1.0, seed=label)
        share = accuracy(net, images, torch.full((len(images),), label))
        recognised.append(share)
        print(f"  generated '{captions_for(label)[0]}': {share:.2f} recognised")
    print(f"generation: {sum(recognised) / len(recognised):.3f} of generated images recognised as the prompted "
          f"class (chance 0.100), {args.per_class} per class")

    if args.capacity:
        for shape, n_q, k in (("4x64", 4, 64), ("1x256", 1, 256)):
            run = train_stage(f"capacity-{shape}", "tiny-1-tokenizer.yaml", None, f"model.tokenizer.n_q={n_q}",
                              f"model.tokenizer.codebook_size={k}")
            final = [r for r in metrics(run) if "eval_recon_mse" in r][-1]
            print(f"tokenizer {shape}: recon MSE {final['eval_recon_mse']:.4f}, least-used sub-codebook "
                  f"{final['eval_usage_min']:.2f}, mean perplexity {final['eval_perplexity_mean']:.1f}")


if __name__ == "__main__":
    main()
