"""DeepSpeed ZeRO engine (`parallel.engine: deepspeed`): ZeRO-1/2/3 and ZeRO-3 with optimizer and
parameter CPU offload against one process of keel's torch engine (fp32, CPU, gloo, 2 ranks), a
checkpoint that resumes after SIGKILL, resharding between ZeRO layouts and to and from the torch
engine, `keel export hf` of a ZeRO-3 checkpoint, and one-line errors for what cannot combine.

The first DeepSpeed run on a machine JIT-compiles DeepSpeed's shm_comm op (~90 s, cached in
TORCH_EXTENSIONS_DIR); every later run takes ~10-20 s.
"""
import json
import re
import shutil
import sys

import pytest
import torch

import keel
from conftest import TINY_RECIPE, assert_same_training, run_keel, small_run_overrides

import deepspeed  # noqa: E402,F401  (keel[dev] installs it: missing is a broken setup, never a skip)

COMMON = {"train.steps": 5, "checkpoint.every": 3}
DS = {"parallel.engine": "deepspeed"}
RUNS = {
    # name: (processes, overrides)
    "single": (1, {}),  # the reference: keel's torch engine on one process
    "z1": (2, {**DS, "parallel.zero_stage": 1}),
    "z2": (2, {**DS, "parallel.zero_stage": 2}),
    "z3": (2, {**DS, "parallel.zero_stage": 3}),
    "z3_offload": (2, {**DS, "parallel.zero_stage": 3, "parallel.offload_optimizer": "true",
                       "parallel.offload_params": "true"}),
}
# fp32 throughout: only the order of floating-point sums differs from one process (ZeRO reduces
# gradients in buckets and computes the norm over partitions). Measured: losses equal to the last
# printed digit, grad norms within 2e-7 relative, final weights within 2e-6 absolute.
LOGIT_ATOL = 1e-5  # keel.load vs transformers on the exported folder (measured: 0)


STDOUT = {}  # layout name -> what its training run printed


@pytest.fixture(scope="module")
def run(module_tmp):
    """Trains a layout once per module (5 steps, checkpoints at steps 3 and 5); returns its run dir."""
    root, done = module_tmp, {}

    def get(name):
        if name not in done:
            nproc, extra = RUNS[name]
            proc = run_keel(["train", str(TINY_RECIPE), *small_run_overrides(root / name, **{**COMMON, **extra})],
                            nproc=nproc)
            done[name], STDOUT[name] = root / name, proc.stdout
        return done[name]
    return get


def train(run_dir, nproc, extra, env=None, check=True):
    return run_keel(["train", str(TINY_RECIPE), *small_run_overrides(run_dir, **{**COMMON, **extra})],
                    nproc=nproc, env=env, check=check)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["z1", "z2", "z3", "z3_offload"])
def test_zero_matches_single_process(run, layout):
    assert_same_training(run("single"), run(layout))
    meta = json.loads((run(layout) / "checkpoints" / "step_5" / "trainer.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == RUNS[layout][1]["parallel.zero_stage"]
    ds_files = sorted(p.name for p in (run(layout) / "checkpoints" / "step_5" / "deepspeed").iterdir())
    assert any("optim_states" in f for f in ds_files), ds_files  # DeepSpeed's own sharded files


@pytest.mark.distributed
def test_zero3_builds_each_rank_only_its_partition(run):
    """ZeRO-3 builds the model under deepspeed.zero.Init: each of the 2 ranks allocates half of the
    parameter elements (DeepSpeed pads each parameter to a multiple of the world size), and the
    initial weights are one process's: the losses and weights track the torch engine's."""
    assert_same_training(run("single"), run("z3"))
    held = re.findall(r"ZeRO-3 model built under zero\.Init: rank (\d) holds (\d+) of (\d+) parameter elements",
                      STDOUT["z3"])
    assert sorted(int(r) for r, _, _ in held) == [0, 1], STDOUT["z3"][-2000:]
    total = int(held[0][2])
    n_params = len(keel.load(run("z3")).state_dict())
    for _, mine, of in held:
        assert int(of) == total and total / 2 <= int(mine) <= total / 2 + n_params, held


@pytest.mark.distributed
def test_deepspeed_checkpoint_resumes_after_sigkill(run, tmp_path):
    """Rank 1 is SIGKILLed midway through step 5 of a ZeRO-2 run; the rerun resumes from step_3
    with DeepSpeed's load_checkpoint and continues exactly as the uninterrupted run."""
    layout = RUNS["z2"][1]
    crashed = train(tmp_path, 2, layout, env={"KEEL_FAULT_KILL_AT_STEP": "5", "KEEL_FAULT_KILL_RANK": "1"},
                    check=False)
    assert crashed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]  # no partial step_5
    resumed = train(tmp_path, 2, layout)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_3'}" in resumed.stdout
    assert "resharded" not in resumed.stdout  # the same layout: DeepSpeed's own load
    assert_same_training(run("single"), tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("saved, nproc, resumed", [
    # Activation checkpointing renames parameters (`_checkpoint_wrapped_module`): covered here too.
    ("z3", 1, {"parallel.activation_checkpoint": "selective"}),  # deepspeed -> torch, 2 ranks -> 1
    ("z2", 1, {**DS, "parallel.zero_stage": 3, "parallel.activation_checkpoint": "full"}),  # ZeRO-2 x2 -> ZeRO-3 x1
    ("single", 2, RUNS["z3_offload"][1]),  # torch -> deepspeed ZeRO-3 with CPU offload
], ids=["z3x2_to_torch_x1", "z2x2_to_z3x1", "torch_x1_to_z3_offload_x2"])
def test_checkpoint_resumes_in_another_layout(run, tmp_path, saved, nproc, resumed):
    """Step 3 of one layout continues in another exactly as one process would have: weights, AdamW
    moments and step, data position and schedule all carried over."""
    shutil.copytree(run(saved) / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    proc = train(tmp_path, nproc, resumed)
    assert "resharded" in proc.stdout and "weights and AdamW state" in proc.stdout
    assert "WARNING" not in proc.stdout
    assert_same_training(run("single"), tmp_path, steps=(4, 5))


def test_export_hf_of_zero3_checkpoint(run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_keel(["export", "hf", str(run("z3")), str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = keel.load(run("z3"))(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < LOGIT_ATOL


# ------------------------------------------------------------------ config and errors, in-process

def cfg_with(tmp_path, **extra):
    return keel.load_recipe(TINY_RECIPE, small_run_overrides(tmp_path, **{**COMMON, **DS, **extra}))


def test_generated_ds_config(tmp_path):
    from keel.train.deepspeed import generate_ds_config

    (tmp_path / "over.json").write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    cfg = cfg_with(tmp_path, **{"parallel.zero_stage": 3, "parallel.offload_optimizer": "true",
                                "parallel.offload_params": "true", "precision.dtype": "bf16",
                                "parallel.ds_config": str(tmp_path / "over.json")})
    ds = generate_ds_config(cfg, dp_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 1000}  # deep-merged, not replaced
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    inline = cfg_with(tmp_path, **{"parallel.ds_config": "{zero_optimization: {stage: 2}}"})
    assert generate_ds_config(inline, dp_size=1)["zero_optimization"] == {"stage": 2}


def keel_error(capsys, tmp_path, extra, modules=None, monkeypatch=None):
    from keel.cli import main

    if modules:
        for name, value in modules.items():
            monkeypatch.setitem(sys.modules, name, value)
    with pytest.raises(SystemExit) as e:
        main(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path, **{**COMMON, **DS, **extra})])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("keel: error: "), err
    return err


@pytest.mark.parametrize("extra, message", [
    ({"parallel.tp": 2}, "parallel.tp: 2 cannot be combined with parallel.engine: deepspeed"),
    ({"parallel.dp_replicate": 2}, "parallel.dp_replicate: 2 cannot be combined with parallel.engine: deepspeed"),
    ({"parallel.cp": 2}, "parallel.cp: 2 cannot be combined with parallel.engine: deepspeed"),
    ({"precision.fp8": "torchao"}, "precision.fp8: torchao cannot be combined with parallel.engine: deepspeed"),
    ({"optim.name": "muon"}, "optim.name: muon cannot be combined with parallel.engine: deepspeed"),
    ({"parallel.zero_stage": 2, "parallel.offload_params": "true"},
     "parallel.offload_params: needs parallel.zero_stage 3, got 2"),
    ({"parallel.zero_stage": 4}, "parallel.zero_stage: expected 1, 2 or 3, got 4"),
    ({"parallel.engine": "megatron"}, "parallel.engine: expected one of 'torch' | 'deepspeed'"),
    ({"parallel.ds_config": "/nonexistent/ds.json"}, "parallel.ds_config: cannot read /nonexistent/ds.json"),
    ({"parallel.ds_config": "{gradient_accumulation_steps: 1}"},
     "parallel.ds_config: gradient_accumulation_steps must stay 4"),
], ids=["tp", "dp_replicate", "cp", "fp8", "muon", "offload_params_z2", "zero_stage_4", "engine_name",
        "ds_config_missing_file", "ds_config_batch_key"])
def test_bad_combinations_fail_in_one_line(capsys, tmp_path, extra, message):
    assert message in keel_error(capsys, tmp_path, extra)


def test_missing_deepspeed_names_the_extra(capsys, tmp_path, monkeypatch):
    err = keel_error(capsys, tmp_path, {}, modules={"deepspeed": None}, monkeypatch=monkeypatch)
    assert "parallel.engine: deepspeed is not installed; pip install 'keel[dev]'" in err

