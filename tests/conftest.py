"""Shared fixtures. Tests use the real corpora and SmolLM2 fetched by scripts/setup.sh."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from filelock import FileLock

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
# Under pytest-xdist (`-n 2`, the README's command) two workers share the cores: one thread each,
# so neither's OpenMP threads spin-wait on a core the other holds.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "lm" / "tiny.yaml"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under `-n 2 --dist loadfile` each module runs whole on one worker, in this order. The RL module
    goes first: it trains the OneRec-V2 that two later modules reuse (conftest's `trained`)."""
    items.sort(key=lambda item: item.module.__name__.rpartition(".")[2] != "test_rec_rl")


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder of this test run that every xdist worker sees (their common base)."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


def small_run_overrides(out_dir: Path, **extra) -> list[str]:
    """A model small enough for multi-process tests on 2 cores, on the real tiny recipe's data."""
    settings = {
        "run.out_dir": str(out_dir), "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.ffn_dim": 128, "data.seq_len": 64, "train.micro_batch": 2,
        "train.global_batch": 8, "train.steps": 6, "train.eval_every": 0, "train.eval_batches": 2,
        "train.sample_tokens": 0, "optim.warmup_steps": 2, "checkpoint.every": 0,
        "logging.wandb": "disabled", "logging.progress": False,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


# A rank that dies of a signal in native code (torchrun's summary: "exitcode  : -6" SIGABRT, "-11" SIGSEGV)
# rather than of a Python exception. On this CPU the one seen was gloo's TCP transport aborting rank 0 of a
# tp2 run mid-forward (CI, 1 of ~40 fresh-clone runs; 12 reruns of the same command under load passed).
NATIVE_CRASH = re.compile(r"exitcode\s*:\s*-(6|11) ")
CRASH_LINES = re.compile(r"terminate called|what\(\)|Fatal Python|Segmentation fault|gloo::|EnforceNotMet|\bAborted\b")


def run_keel(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `keel ...` in a fresh process (or under torchrun with nproc ranks).

    A multi-rank run whose rank died in native code is run once more, with a warning that names the
    crash: keel is Python, so a Python-level failure (a wrong number, an exception) is never retried,
    but a transport crash in gloo is not a fact about keel and should not fail the suite on its own."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "keel", *args]
    else:
        cmd = [sys.executable, "-m", "keel", *args]
    out_dir = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("run.out_dir=")), None)
    fresh_dir = out_dir is not None and not out_dir.exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0 and nproc > 1 and NATIVE_CRASH.search(proc.stderr):
        crash = [line for line in proc.stderr.splitlines() if CRASH_LINES.search(line)]
        warnings.warn(f"a rank of `keel {' '.join(args[:2])}` died in native code; ran it again: "
                      + (" | ".join(crash[:6]) or "no message"))
        if fresh_dir and out_dir.exists():  # the rerun starts as the first did, not from the crash's checkpoint
            shutil.move(out_dir, out_dir.with_name(out_dir.name + ".native-crash"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        crash = "\n".join(line for line in proc.stderr.splitlines() if CRASH_LINES.search(line))
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}\n{('native crash lines:' + chr(10) + crash) if crash else ''}")
    return proc


def keel_refusal(args: list[str]) -> str:
    """The one-line error of `keel ARGS`, which must exit 2 without a traceback.

    Runs keel's CLI entry point (keel.cli.main, where errors become that line and exit code) in this
    process: a refusal at the boundary costs ~0.1 s here instead of ~5 s in a fresh interpreter.
    Only for refusals that come before a process group exists (the check below says so)."""
    import contextlib
    import io

    from keel.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # keel's preemption hooks
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        raise AssertionError(f"keel {' '.join(map(str, args))}: refused after joining a process group; test it "
                             f"in a subprocess (run_keel) instead")
    lines = err.getvalue().strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-3000:]
    return lines[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A directory for one test module's shared runs, removed when the module ends: a full suite
    writes ~14 GB of checkpoints and HF exports, more than a CI disk may hold at once."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_recipe() -> Path:
    return TINY_RECIPE


# OneRec-V2 on the real MovieLens-100K: one SID table and one trained tiny model, shared by the
# training tests (tests/test_recsys_train.py) and the recommender RL tests (tests/test_rec_rl.py).
ONEREC = str(REPO / "recipes/recsys/onerec-tiny.yaml")


@pytest.fixture(scope="session")
def sid_table(tmp_path_factory):
    folder = shared_dir(tmp_path_factory, "sid")
    path = folder / "ml-100k.sid.npz"
    with FileLock(f"{folder}.lock"):  # built once per test run, whichever worker asks first
        if not path.exists():
            out = run_keel(["sid", "build", ONEREC, f"recsys.sid_table={path}"]).stdout
            assert "utilisation per level: 1.000, 1.000, 1.000" in out and str(path) in out
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sid_table):
    """A bounded run of the shipped tiny recipe: 900 steps, 2-3 minutes on 2 cores; made once per test
    run (the other worker waits for it rather than training its own)."""
    out = shared_dir(tmp_path_factory, "trained")
    with FileLock(f"{out}.lock"):
        if not (out / "DONE").exists():
            run_keel(["train", ONEREC, f"recsys.sid_table={sid_table}", f"run.out_dir={out}", "train.steps=900",
                      "train.eval_every=0", "checkpoint.every=0", "logging.wandb=disabled",
                      "logging.progress=false"], timeout=1200)
            (out / "DONE").touch()
    return out


# Layout comparisons (tests/test_parallel.py, tests/test_deepspeed.py). fp32 on CPU: only the order
# of floating-point sums differs between layouts. Adam divides by sqrt(v): on embedding rows that
# see only ~1e-9 gradients, fp32 rounding moves the update by up to ~2e-5 after 5 steps at lr 2e-3
# (measured 1.6e-5, 2 of 3M entries), hence the weight tolerance.
LOSS_RTOL, GRAD_NORM_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 5e-5


def assert_same_training(reference, other, steps=(1, 2, 3, 4, 5)):
    """`other` trained exactly like `reference`: same data, losses, grad norms and final weights."""
    import keel

    ref = {r["step"]: r for r in read_metrics(reference)}
    got = {r["step"]: r for r in read_metrics(other) if "loss" in r}
    assert sorted(got) == list(steps)  # nothing repeated, nothing skipped
    for step in steps:
        a, b = ref[step], got[step]
        assert b["data_fingerprint"] == a["data_fingerprint"]
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL)
    assert ref[max(ref)]["loss"] < ref[1]["loss"]  # it trained, so the equalities say something
    # The final weights depend on the AdamW moments too: a resume that lost them would differ by ~1e-3.
    w_ref, w_got = keel.load(reference).state_dict(), keel.load(other).state_dict()
    assert w_got.keys() == w_ref.keys()
    for name, value in w_ref.items():
        torch.testing.assert_close(w_got[name], value, rtol=1e-4, atol=WEIGHT_ATOL, msg=name)


def assert_weights_agree_to_rounding(expected: dict, actual: dict, atol: float = 2e-4, stray: int = 4) -> None:
    """Two runs that differ only in fp32 summation order (one process vs several ranks) end on the same
    weights: every entry within `atol`, and at most `stray` entries per tensor more than 1e-5 apart.
    Adam divides each gradient by its own running size, so an entry whose gradient is near zero turns
    a rounding-level difference into a visible step (measured: a handful of embedding entries, 1e-5
    to 8e-5 apart after 3 steps at lr 1e-2, everything else within 1e-6)."""
    for name, value in expected.items():
        diff = (actual[name] - value).abs()
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=name)
        assert int(diff.gt(1e-5).sum()) <= stray, f"{name}: {int(diff.gt(1e-5).sum())} entries more than 1e-5 apart"
