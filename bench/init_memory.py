"""Peak host memory per rank while a model is built and initialised, on 1, 2 and 4 ranks (CPU, gloo).

    python bench/init_memory.py [--ranks 1,2,4] [overrides...]

Each run is `keel init` (build on meta -> FSDP over all ranks -> materialise this rank's shards ->
draw the initial weights -> write a seed checkpoint), with every rank sampling its resident memory
(VmRSS) in a thread; the figure is the peak above the rank's resident memory after imports. The
side-by-side column is what every rank held before meta-first init: the whole fp32 model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "lm" / "tiny.yaml"
# 53.5M parameters (214 MB fp32), most of them in 16 blocks: weights dominate at init.
SHAPE = ["model.dim=384", "model.n_layers=16", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_dim=1536"]

WORKER = """
import json, os, sys, threading, time
import keel.cli, keel.train.init, keel.train.trainer
# Building on the meta device imports TorchDynamo (torch's Python kernel for normal_ on meta tensors
# is wrapped in a dynamo guard): code, not the model's memory, so it is loaded before the baseline.
import torch._dynamo

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

base, peak, done = rss_kib(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_kib())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
keel.cli.main(sys.argv[1:])
done.set()
with open(os.environ["PEAK_OUT"] + "_" + os.environ.get("RANK", "0"), "w") as f:
    json.dump({"kib": peak[0] - base}, f)
"""


def peak_per_rank(ranks: int, overrides: list[str], work: Path) -> list[float]:
    worker = work / "worker.py"
    worker.write_text(WORKER)
    out = work / f"peak{ranks}"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "PEAK_OUT": str(out), "OMP_NUM_THREADS": "1"}
    subprocess.run([*launcher, str(worker), "init", str(RECIPE), *overrides, "--out", str(work / f"seed{ranks}")],
                   env=env, check=True, capture_output=True)
    return [json.loads(Path(f"{out}_{r}").read_text())["kib"] / 1024 for r in range(ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("overrides", nargs="*", help="recipe overrides (default: a 53.5M-parameter shape)")
    args = p.parse_args()
    overrides = args.overrides or SHAPE
    import keel
    from keel.model.registry import build_model
    cfg = keel.load_recipe(RECIPE, overrides)
    n_params = sum(t.numel() for t in build_model(cfg.model, "meta").parameters())
    whole_mib = n_params * 4 / 2**20
    print(f"model: {n_params / 1e6:.1f}M parameters = {whole_mib:.0f} MiB in fp32 ({' '.join(overrides)})")
    print("| ranks | peak MiB per rank (max) | share of the whole model | before meta-first init |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (int(r) for r in args.ranks.split(",")):
            peak = max(peak_per_rank(ranks, overrides, Path(tmp)))
            print(f"| {ranks} | {peak:.0f} | {peak / whole_mib:.2f} | >= {whole_mib:.0f} (1.00) |", flush=True)


if __name__ == "__main__":
    main()
