"""The scale core on CPU (gloo): the model is built on meta and only each rank's shards are ever
materialised; initial weights are the same in every layout, with or without a seed checkpoint
(`keel init`); one host sync per training step; bf16 numerics that do not depend on the layout;
`train.profile_steps`."""
import importlib.util
import json
import threading

import pytest
import torch

from conftest import REPO, TINY_RECIPE, assert_same_training, keel_refusal, read_metrics, run_keel, small_run_overrides

COMMON = {"model.qk_norm": "true", "model.n_layers": 4, "train.steps": 5}

# bench/init_memory.py measures it (`keel init` with every rank sampling its resident memory) on a
# 53.5M-parameter shape (214 MB in fp32) whose largest tensor, the 49,152 x 384 embedding table (the
# largest full-size temporary of sharded init), is a third of it.
_spec = importlib.util.spec_from_file_location("init_memory", REPO / "bench" / "init_memory.py")
init_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(init_memory)


@pytest.mark.distributed
def test_seed_checkpoint_gives_every_layout_the_single_process_start(tmp_path):
    """`keel init` on 2 ranks (each drawing and writing only its shards) makes the weights one
    process draws from train.seed; fsdp2 from that seed checkpoint trains exactly like one process
    that initialised itself."""
    seed = tmp_path / "seed"
    run_keel(["init", str(TINY_RECIPE), *small_run_overrides(tmp_path / "unused", **COMMON), "--out", str(seed)],
             nproc=2)
    assert json.loads((seed / "checkpoints" / "step_0" / "trainer.json").read_text())["seed_checkpoint"]
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "single", **COMMON)])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "fsdp2_seeded", **COMMON,
             **{"model.init_from": str(seed), "parallel.dp_shard": 2})], nproc=2)
    assert_same_training(tmp_path / "single", tmp_path / "fsdp2_seeded")


def test_keel_init_refuses_a_used_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "already exists" in keel_refusal(["init", TINY_RECIPE, "--out", tmp_path / "taken"])
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.distributed
def test_sharded_init_holds_a_fraction_of_the_model_per_rank(tmp_path):
    """Peak resident memory added by building, initialising and saving the model (`keel init`): on
    each of 2 FSDP ranks at most its half of the weights plus one full-size temporary of the largest
    parameter (sharded init draws one parameter whole at a time), +10% slack, and below 75% of one
    process's. Measured: 0.72 of one process (158 vs 219 MB). Before meta-first init every rank
    held the whole model."""
    single = init_memory.peak_per_rank(1, init_memory.SHAPE, tmp_path)[0]
    per_rank = init_memory.peak_per_rank(2, init_memory.SHAPE, tmp_path)
    params_mib, largest_mib = 53.5e6 * 4 / 2**20, 49152 * 384 * 4 / 2**20
    assert single > 0.9 * params_mib  # the measurement sees the weights
    assert max(per_rank) < 1.1 * (params_mib / 2 + largest_mib), (single, per_rank)
    assert max(per_rank) < 0.75 * single, (single, per_rank)


def test_one_host_sync_per_training_step(tmp_path, monkeypatch):
    """Counted on the training thread (the data thread is not the GPU's business): a non-log step
    reads the device once. AdamW's step counters are not device reads: without `capturable` torch
    keeps them on the host, on a GPU too."""
    import keel
    from keel.train.engines import build_trainer

    cfg = keel.load_recipe(TINY_RECIPE, small_run_overrides(tmp_path / "run", **{"train.log_every": 100}))
    trainer = build_trainer(cfg)
    trainer.train_step()  # warm-up (lazy inits)
    main = threading.main_thread()
    calls = []
    host_counters = {id(state["step"]) for state in trainer.optimizer.state.values()}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if threading.current_thread() is main and id(self) not in host_counters:
                calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    trainer.train_step()
    monkeypatch.undo()
    assert calls == ["tolist"], calls


@pytest.mark.distributed
def test_bf16_fsdp_tracks_bf16_single_process(tmp_path):
    """bf16 under FSDP (bf16 weights in compute, fp32 reduction) stays within 1% of one process's
    bf16 autocast over 3 steps. RoPE's cos/sin stay fp32 in both (FSDP no longer casts them). 3 steps:
    on a CPU without native bf16 matmuls (AVX2 only) each bf16 step takes seconds."""
    bf16 = {**COMMON, "precision.dtype": "bf16", "train.steps": 3, "data.seq_len": 32}
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "single", **bf16)])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "fsdp2", **bf16,
             **{"parallel.dp_shard": 2})], nproc=2)
    single = [r["loss"] for r in read_metrics(tmp_path / "single") if "loss" in r]
    fsdp = [r["loss"] for r in read_metrics(tmp_path / "fsdp2") if "loss" in r]
    assert fsdp == pytest.approx(single, rel=0.01)


def test_profile_steps_write_a_trace(tmp_path):
    run = tmp_path / "run"
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(run, **{"train.steps": 3, "train.profile_steps": "[2]"})])
    trace = run / "profile" / "step_2_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") for e in events)  # the step's matmuls are in it
    assert not (run / "profile" / "step_1_rank0.json").exists()


def test_bad_profile_steps_is_one_line(tmp_path):
    error = keel_refusal(["train", TINY_RECIPE, *small_run_overrides(tmp_path / "r", **{"train.profile_steps": "[0]"})])
    assert "train.profile_steps" in error


@pytest.mark.distributed
def test_init_from_an_hf_folder_reads_it_shard_by_shard(tmp_path):
    """model.init_from naming an HF folder: 2 FSDP ranks read their slices of its safetensors and
    train exactly like one process started from the same folder converted by `keel import hf`."""
    overrides = small_run_overrides(tmp_path / "unused", **COMMON)
    run_keel(["init", str(TINY_RECIPE), *overrides, "--out", str(tmp_path / "seed")])
    run_keel(["export", "hf", str(tmp_path / "seed"), str(tmp_path / "hf")])
    run_keel(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "imported")])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "from_import", **COMMON,
             **{"model.init_from": str(tmp_path / "imported")})])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "from_hf", **COMMON,
             **{"model.init_from": str(tmp_path / "hf"), "parallel.dp_shard": 2})], nproc=2)
    assert_same_training(tmp_path / "from_import", tmp_path / "from_hf")


def test_init_from_an_hf_folder_of_another_shape_is_one_line(tmp_path):
    run_keel(["init", str(TINY_RECIPE), *small_run_overrides(tmp_path / "unused"), "--out", str(tmp_path / "seed")])
    run_keel(["export", "hf", str(tmp_path / "seed"), str(tmp_path / "hf")])
    result = run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "run", **{
        "model.init_from": str(tmp_path / "hf"), "model.ffn_dim": 256})], check=False)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "model.init_from" in line and "ffn_dim 128 vs 256" in line and "keel import hf" in line
