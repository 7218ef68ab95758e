"""Fault tolerance without SLURM: torchrun --max-restarts after a rank is killed, the NaN/Inf
policies (skip, rollback, stop), preemption by signal on one process, and rank discovery.
Weights are compared with torch.equal: every recovery path must be bit-identical (fp32, CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import keel
from conftest import REPO, TINY_RECIPE, keel_refusal, read_metrics, run_keel, small_run_overrides
from keel.train import launch
from keel.train.faults import PREEMPTED_EXIT_CODE, REQUEUE_MARKER


def weights(path):
    return {k: v.clone() for k, v in keel.load(path).state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ (torch.equal): {different[:5]}"


def steps_losses(run_dir):
    return [(r["step"], r["loss"], r["data_fingerprint"]) for r in read_metrics(run_dir) if "loss" in r]


def train_args(out_dir, **extra):
    return ["train", str(TINY_RECIPE), *small_run_overrides(out_dir, **extra)]


# ---------------------------------------------------------------- elastic restart (torchrun)

def torchrun_keel(args, max_restarts, env, timeout=300):
    """torchrun with restarts, as keel/cli/templates/train.sbatch.j2 runs it (a fresh TCPStore per attempt: with
    the shared one, a restarted group can hang in init_process_group, pytorch/pytorch#135712)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "keel", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True,  # on a timeout, stop torchrun and its workers together
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                                 **env})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout}s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.distributed
def test_torchrun_restart_after_one_rank_is_killed_resumes_exactly(tmp_path):
    """Rank 1 is SIGKILLed midway through step 5; torchrun (--max-restarts=1) restarts both ranks,
    which resume from step_3 and end with the uninterrupted run's weights and losses."""
    extra = {"train.steps": 7, "checkpoint.every": 3, "checkpoint.keep_last": 5}
    straight = torchrun_keel(train_args(tmp_path / "straight", **extra), 0, {})
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = {"KEEL_FAULT_KILL_AT_STEP": "5", "KEEL_FAULT_KILL_RANK": "1"}
    elastic = torchrun_keel(train_args(tmp_path / "elastic", **extra), 1, env)
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "resumed from" in elastic.stdout and "step_3" in elastic.stdout  # the restart resumed
    assert "SIGKILL" in elastic.stderr or "Signals.SIGKILL" in elastic.stderr or "-9" in elastic.stderr
    assert steps_losses(tmp_path / "elastic") == steps_losses(tmp_path / "straight")  # exact floats
    assert_same_weights(tmp_path / "elastic", tmp_path / "straight")


# ---------------------------------------------------------------- NaN / Inf policies

@pytest.fixture(scope="module")
def single_reference(module_tmp):
    """An uninterrupted single-process run, 12 steps, checkpoints every 4."""
    out = module_tmp / "reference"
    run_keel(train_args(out, **REF))
    return out


REF = {"train.steps": 12, "checkpoint.every": 4, "checkpoint.keep_last": 10}


def test_nan_skip_drops_the_update_and_goes_on(tmp_path):
    run = run_keel(train_args(tmp_path, **{"train.steps": 5, "checkpoint.every": 1, "checkpoint.keep_last": 10,
                                           "train.nonfinite": "skip"}), env={"KEEL_FAULT_NAN_AT_STEP": "3"})
    assert "step 3: loss nan" in run.stderr and "update skipped" in run.stderr
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[3]["nonfinite"] == "skip" and rows[3]["loss"] != rows[3]["loss"]  # NaN, logged
    assert all("nonfinite" not in rows[s] for s in (1, 2, 4, 5))
    assert rows[4]["lr"] == rows[3]["lr"]  # the schedule did not advance on the skipped step
    ckpt = tmp_path / "checkpoints"
    assert_same_weights(ckpt / "step_3", ckpt / "step_2")  # no update at step 3
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())
    assert rows[5]["loss"] < rows[1]["loss"]


def test_nan_rollback_replays_from_the_last_checkpoint_exactly(tmp_path, single_reference):
    run = run_keel(train_args(tmp_path, **REF, **{"train.nonfinite": "rollback"}),
                   env={"KEEL_FAULT_NAN_AT_STEP": "6"})
    assert "step 6: loss nan" in run.stderr and "rolled back to" in run.stderr and "step_4" in run.stderr
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7)) + list(range(5, 13))  # 6 failed; 5.. replayed
    assert rows[5]["nonfinite"] == "rollback"
    replayed = [(r["step"], r["loss"]) for r in rows[:4] + rows[6:]]  # history as of step_4, then the replay
    assert replayed == [(r["step"], r["loss"]) for r in read_metrics(single_reference)]
    assert_same_weights(tmp_path, single_reference)


def test_nan_stop_fails_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    run = run_keel(train_args(tmp_path, **{"train.steps": 6, "checkpoint.every": 2}),
                   env={"KEEL_FAULT_NAN_AT_STEP": "3"}, check=False)
    assert run.returncode == 2
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("keel: error: step 3: loss nan") and "train.nonfinite is 'stop'" in error
    assert "step_2" in error and "Traceback" not in run.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    assert read_metrics(tmp_path)[-1]["nonfinite"] == "stop"


def test_rollback_without_a_checkpoint_says_so(tmp_path):
    run = run_keel(train_args(tmp_path, **{"train.steps": 3, "train.nonfinite": "rollback"}),
                   env={"KEEL_FAULT_NAN_AT_STEP": "2"}, check=False)
    assert run.returncode == 2
    assert "no committed checkpoint" in run.stderr.strip().splitlines()[-1]


def test_bad_nonfinite_value_is_a_config_error(tmp_path):
    error = keel_refusal(train_args(tmp_path, **{"train.nonfinite": "ignore"}))
    assert error.startswith("keel: error: train.nonfinite: expected one of 'skip' | 'rollback' | 'stop'")


# ---------------------------------------------------------------- preemption on one process

def wait_for_rows(run_dir, n, proc, timeout=300):
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {n}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {n} within {timeout}s")


def test_sigterm_checkpoints_stops_and_the_rerun_resumes_exactly(tmp_path, single_reference):
    """SIGTERM (SIGUSR1 is the same path; tests/test_slurm.py sends it through SLURM)."""
    sig = signal.SIGTERM
    args = [sys.executable, "-m", "keel", *train_args(tmp_path, **REF)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # the threads run_keel gives the reference and the rerun: other sum orders
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    wait_for_rows(tmp_path, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    marker = json.loads((tmp_path / REQUEUE_MARKER).read_text())
    stopped_at = marker["step"]
    assert marker["signal"] == sig.name and 2 <= stopped_at < REF["train.steps"], marker
    assert (tmp_path / "checkpoints" / f"step_{stopped_at}" / "COMPLETE").is_file()
    assert f"preempted by {sig.name} after step {stopped_at}" in err
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, stopped_at + 1))

    rerun = run_keel(train_args(tmp_path, **REF))
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped_at}'}" in rerun.stdout
    assert not (tmp_path / REQUEUE_MARKER).exists()
    assert steps_losses(tmp_path) == steps_losses(single_reference)
    assert_same_weights(tmp_path, single_reference)


# ---------------------------------------------------------------- rank discovery, the flag

def test_rank_discovery_from_torchrun_and_slurm_environments():
    torchrun = launch.discover_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                                      "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert (torchrun.source, torchrun.rank, torchrun.world_size, torchrun.local_rank) == ("torchrun", 3, 8, 1)
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[01-04]"}
    srun = launch.discover_ranks(step, resolve_head=lambda nodelist: f"head-of-{nodelist}")
    assert (srun.source, srun.rank, srun.world_size, srun.local_rank) == ("slurm", 5, 8, 1)
    assert (srun.master_addr, srun.master_port) == ("head-of-gpu[01-04]", launch.slurm_rendezvous_port("1234"))
    pinned = launch.discover_ranks({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (pinned.master_addr, pinned.master_port) == ("10.0.0.1", 29500)
    # The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but is no srun task: one process.
    batch = launch.discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert (batch.source, batch.world_size) == ("single", 1)


def test_preemption_flag_records_the_signal():
    saved = {s: signal.getsignal(s) for s in launch.PREEMPTION_SIGNALS}
    try:
        flag = launch.PreemptionFlag()
        flag.install()
        assert not flag.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested(torch.device("cpu")) and flag.signal_name == "SIGUSR1"
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
