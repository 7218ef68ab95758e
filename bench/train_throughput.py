"""keel's trainer vs a plain transformers training loop: same Llama shape, weights, data, batch,
precision and optimizer. Prints tokens/s side by side, and MFU on GPU.

    python bench/train_throughput.py                     # CPU: the tiny recipe's model
    python bench/train_throughput.py --preset 1b         # GPU: ~1B Llama at seq 4096, bf16

Both loops start from the same weights and see the same batches; their first losses are printed
to show they compute the same thing. Timing skips `--warmup` steps and reports the median step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # name: (recipe overrides, description)
    "tiny": ([], "recipes/lm/tiny.yaml model, seq 128, 16 sequences/step, fp32"),
    "1b": (["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8",
            "model.ffn_dim=8192", "model.max_seq_len=4096", "data.seq_len=4096", "train.micro_batch=2",
            "train.global_batch=2", "precision.dtype=bf16"], "~1.2B Llama, seq 4096, bf16"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_keel(trainer, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync(trainer.dist.device)
        t0 = time.perf_counter()
        out = trainer.train_step()
        sync(trainer.dist.device)
        if i == 0:
            print(f"  keel first loss {out['loss']:.5f}")
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_transformers(trainer, batches, steps: int, warmup: int) -> list[float]:
    """The loop a user would write: LlamaForCausalLM, logits, cross-entropy, AdamW."""
    from transformers import LlamaForCausalLM
    from keel.model.hf import keel_to_hf_config, keel_to_hf_state_dict

    cfg, device = trainer.cfg, trainer.dist.device
    hf_cfg = keel_to_hf_config(cfg.model)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    model.load_state_dict(keel_to_hf_state_dict(trainer.model.state_dict(), cfg.model), strict=False)
    model.tie_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, foreach=True)
    autocast = cfg.precision.dtype == "bf16"
    times = []
    for i in range(warmup + steps):
        micro = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        n_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro)
        total = 0.0
        for mb in micro:
            ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
            (loss / n_tokens).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i == 0:
            print(f"  transformers first loss {total / n_tokens:.5f}")
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = p.parse_args()

    import keel
    from keel.train.trainer import Trainer

    overrides, description = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = keel.load_recipe(REPO / "recipes/lm/tiny.yaml", [
            *overrides, f"run.out_dir={tmp}", "logging.wandb=disabled", "logging.progress=false",
            "checkpoint.resume=never", "optim.warmup_steps=0", "optim.schedule=constant", *args.overrides])
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        # Record the batches keel will see so the transformers loop gets the very same ones.
        batches = [trainer.data.next_step() for _ in range(args.warmup + args.steps)]
        trainer.data.load_state_dict({"consumed_samples": 0, "seed": cfg.train.seed})
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in batches[0])
        device = trainer.dist.device
        print(f"preset {args.preset}: {description}; {cfg.model.num_params() / 1e6:.1f}M params; "
              f"{tokens} tokens/step; device {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
        hf_times = bench_transformers(trainer, batches, args.steps, args.warmup)
        keel_times = bench_keel(trainer, args.steps, args.warmup)

    rows = []
    for name, times in (("transformers loop", hf_times), ("keel", keel_times)):
        step = statistics.median(times)
        tps = tokens / step
        mfu = ""
        if trainer.peak_flops:
            mfu = f"{cfg.model.flops_per_token(cfg.data.seq_len) * tps / trainer.peak_flops:.1%}"
        rows.append((name, step, tps, mfu))
    print(f"\n{'loop':<20}{'median step (s)':>16}{'tokens/s':>12}{'MFU':>8}")
    for name, step, tps, mfu in rows:
        print(f"{name:<20}{step:>16.3f}{tps:>12.0f}{mfu:>8}")
    print(f"keel / transformers tokens/s: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
