"""keel on a real SLURM cluster: slurm/local_cluster.sh starts munged, slurmctld and two slurmd
(fake nodes n1, n2) on this machine; jobs are submitted with `keel slurm submit` and run 2 nodes x
1 process (gloo). Their losses and weights must equal a local 2-rank torchrun run's exactly, also
after a preemption signal, checkpoint, requeue and resume. Skipped only where SLURM cannot be
installed (no root or no apt-get); CI installs it in scripts/setup.sh."""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

import keel
from conftest import REPO, TINY_RECIPE, read_metrics, run_keel, small_run_overrides
from keel.cli import slurm

CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
STEPS = 12
EXTRA = {"train.steps": STEPS, "checkpoint.keep_last": 5}
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _free_port_block(n: int) -> int:
    """A port P with P..P+n all free, so the test cluster never meets one already running."""
    for base in range(17100, 30000, 37):
        try:
            for port in range(base, base + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster():
    """Environment (SLURM_CONF, ...) of a 2-node local cluster, started here and stopped after this
    file's tests (module scope: its daemons must not run on beside the tests that follow)."""
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        install = subprocess.run(["bash", str(CLUSTER_SCRIPT), "install"], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"SLURM is not installed and cannot be installed here: {install.stderr.strip()}")
    state = Path(tempfile.mkdtemp(prefix="keel-slurm-test-", dir="/tmp"))  # short: munge's socket path
    env = {**os.environ, "KEEL_SLURM_DIR": str(state), "KEEL_SLURM_PORT": str(_free_port_block(2)),
           "KEEL_SLURM_NODES": "2"}
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True, text=True)
    try:
        assert start.returncode == 0, f"local cluster did not start:\n{start.stdout}\n{start.stderr}"
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, text=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def local_two_ranks(module_tmp):
    """The reference: the same recipe on 2 local ranks (torchrun --standalone, gloo)."""
    out = module_tmp / "local"
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(out, **EXTRA)], nproc=2)
    return out


def keel_cli(args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def submit(run_dir, env, *flags):
    proc = keel_cli(["slurm", "submit", str(TINY_RECIPE), "--nodes", "2", *flags,
                     *small_run_overrides(run_dir, **EXTRA)], env)
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_info(job, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True, env=env).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for_job(job, env, timeout=420) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job, env)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not finish within {timeout}s: {job_info(job, env)}")


def job_log(run_dir, job) -> str:
    return (run_dir / "slurm" / f"lm-tiny-{job}.out").read_text()


def losses(run_dir):
    return [(r["step"], r["loss"], r["data_fingerprint"]) for r in read_metrics(run_dir)]


def assert_same_weights(a, b):
    wa, wb = keel.load(a).state_dict(), keel.load(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ (torch.equal)"


@pytest.mark.distributed
def test_submit_on_two_nodes_equals_two_local_ranks(cluster, local_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(run_dir, cluster)
    info = wait_for_job(job, cluster)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    assert f"keel: job {job} (restart 0) on n[1-2]" in log
    # The resolved recipe beside the log is what the job trained from, and the script is kept too.
    saved = keel.load_recipe(run_dir / "slurm" / f"lm-tiny-{job}.config.yaml")
    assert saved == keel.load_recipe(TINY_RECIPE, small_run_overrides(run_dir, **EXTRA))
    assert "#SBATCH --nodes=2" in (run_dir / "slurm" / f"lm-tiny-{job}.sbatch").read_text()
    assert [s for s, _, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(local_two_ranks)  # exact floats, step by step
    assert_same_weights(run_dir, local_two_ranks)


@pytest.mark.distributed
def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, local_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(run_dir, cluster)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # mid-run: step 2 done
        assert job_info(job, cluster).get("JobState") not in FINISHED, job_log(run_dir, job)[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    info = wait_for_job(job, cluster)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    stopped_at = int(re.search(r"preempted by SIGUSR1 after step (\d+)", log).group(1))
    assert 2 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "COMPLETE").is_file()  # committed
    assert f"job {job} stopped on a committed checkpoint after a preemption signal; requeueing" in log
    assert f"keel: job {job} (restart 1)" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'}" in log
    assert not (run_dir / "PREEMPTED").exists()
    assert losses(run_dir) == losses(local_two_ranks)
    assert_same_weights(run_dir, local_two_ranks)


@pytest.mark.distributed
def test_srun_without_torchrun_finds_ranks_from_slurm(cluster):
    code = ("import torch, torch.distributed as dist; from keel.train import launch; "
            "d = launch.init_distributed(); t = torch.tensor([d.rank + 1]); dist.all_reduce(t); "
            "print(f'rank {d.rank}/{d.world_size} sum {t.item()} backend {dist.get_backend()}'); "
            "launch.shutdown_distributed()")
    proc = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", sys.executable, "-c", code], capture_output=True,
                          text=True, env=cluster, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.split("\n"))[-2:] == ["rank 0/2 sum 3 backend gloo", "rank 1/2 sum 3 backend gloo"]


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0"], "keel: error: --nodes: must be at least 1, got 0"),
    (["--nodes", "2", "--partition", "h100"], "keel: error: --partition: unknown partition 'h100'; "
                                              "this cluster has: debug"),
    (["--nodes", "2", "--gpus-per-node", "-1"], "keel: error: --gpus-per-node: must be 0"),
])
def test_bad_flags_are_one_line_errors(cluster, tmp_path, flags, message):
    proc = keel_cli(["slurm", "submit", str(TINY_RECIPE), *flags, *small_run_overrides(tmp_path)], cluster,
                    check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "slurm").exists()  # nothing submitted


def test_missing_recipe_is_a_one_line_error(tmp_path):
    proc = keel_cli(["slurm", "submit", str(tmp_path / "nope.yaml"), "--nodes", "2"], os.environ, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"keel: error: {tmp_path / 'nope.yaml'}: recipe file not found\n"


def test_world_size_that_the_batch_cannot_split_is_refused(tmp_path):
    proc = keel_cli(["slurm", "submit", str(TINY_RECIPE), "--nodes", "3", "--dry-run",
                     *small_run_overrides(tmp_path)], os.environ, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("keel: error: train.global_batch: 8 is not a multiple of train.micro_batch "
                                  "x data-parallel ranks = 6 on 3 ranks")


def test_dry_run_prints_a_valid_script_with_the_resolved_recipe(tmp_path):
    overrides = small_run_overrides(tmp_path / "run", **{"train.global_batch": 16, "train.micro_batch": 2})
    proc = keel_cli(["slurm", "submit", str(TINY_RECIPE), "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00",
                     "--account", "proj", "--qos", "high", "--max-restarts", "2", "--dry-run", *overrides], os.environ)
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=1:00:00", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120", f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out",
                 "--nproc-per-node=4", "--rdzv-backend=c10d", "--max-restarts=2", '-m keel train "$KEEL_CONFIG"',
                 "scontrol requeue"):
        assert line in script, line
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    embedded = script.split("<<'KEEL_CONFIG_EOF'\n", 1)[1].split("\nKEEL_CONFIG_EOF\n", 1)[0]
    assert yaml.safe_load(embedded) == keel.load_recipe(TINY_RECIPE, overrides).to_dict()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash


def test_rl_template_renders_the_rl_command():
    values = {"sbatch_directives": "#SBATCH --nodes=1", "submit_command": "keel slurm submit x", "python": "python",
              "run_dir": "/r", "log_dir": "/r/slurm", "nproc_per_node": 8, "max_restarts": 0,
              "signal_seconds": 120, "config_yaml": "rl: {}"}
    script = slurm.render((slurm.TEMPLATE_DIR / "rl.sbatch.j2").read_text(), values)
    assert '-m keel rl "$KEEL_CONFIG"' in script and "{{" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(slurm.SlurmError, match="config_yaml"):
        slurm.render("{{ config_yaml }}", {})
