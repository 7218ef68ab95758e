"""KSA continual pretraining: the recipes in recipes/ksa/, and stage 1 (self-distillation) of the real
SmolLM2-135M on real KJV text through keel's Trainer (docs/ksa.md#stage-1-distillation-loss).
bench/ksa_cpt.py is the long run."""
from pathlib import Path

import pytest
import torch

import keel
from keel.model.ksa import is_summary_param
from keel.model.loss import IGNORE_INDEX

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "ksa"
ALL_RECIPES = sorted(RECIPES.glob("*.yaml"))
CPT_4B = ["ksa-4b-cpt-stage1", "ksa-4b-cpt-stage2", "ksa-4b-cpt-stage3-32k", "ksa-4b-cpt-stage3-64k",
          "ksa-4b-cpt-stage3-128k"]


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_ksa_recipe_loads_and_validates(path):
    cfg = keel.load_recipe(path)
    assert cfg.model.name == "ksa"
    m = cfg.model
    # Every recipe trains on contexts well past its KSA window, or it would never use a summary.
    assert cfg.data.seq_len >= 4 * m.window_chunks * m.chunk_size, path.name
    assert m.ksa_stage == ("distill" if "stage1" in path.stem else "full" if "scratch" in path.stem else "anneal")


def test_production_shapes_and_stage_chain():
    """The production shapes (docs/ksa.md#training-recipes), and the CPT stages chained through
    model.init_from at 8k -> 32k -> 64k -> 128k."""
    scratch = keel.load_recipe(RECIPES / "ksa-1.9b-scratch.yaml")
    assert scratch.model.num_params() == pytest.approx(1.93e9, rel=0.01)
    assert (scratch.model.chunk_size, scratch.model.summary_tokens, scratch.model.window_chunks) == (8, 1, 128)
    # Released 1.9B config: one layer in four has a 1,024-chunk window (8,192 tokens).
    assert [scratch.model.layer_window(i) for i in range(8)] == [128, 128, 128, 1024] * 2
    stages = [keel.load_recipe(RECIPES / f"{name}.yaml") for name in CPT_4B]
    assert stages[0].model.num_params() == pytest.approx(4.02e9, rel=0.01)
    assert [s.data.seq_len for s in stages] == [8192, 8192, 32768, 65536, 131072]
    for s in stages:  # hybrid form 2, as the released configuration: every layer KSA, windows tiled
        m = s.model
        assert [m.layer_kind(i) for i in range(m.n_layers)] == ["ksa"] * 36
        assert [m.layer_window(i) for i in range(m.n_layers)] == [128, 128, 128, 1024] * 9
        assert (m.summary_init, m.distill_mse_rms_norm, m.decode_large_window_as_full) == ("reference", False, False)
    # Every KSA recipe trains on whole packed rows (global positions, no document mask), as the reference.
    assert not any(keel.load_recipe(p).data.document_mask for p in ALL_RECIPES)
    for before, after in zip(stages, stages[1:]):
        assert after.model.init_from == before.run.out_dir
    tokens = sum(s.train.steps * s.train.global_batch * s.data.seq_len for s in stages)
    assert tokens == pytest.approx(85e9, rel=0.02)  # the README's CPT token budget
    cpu = [keel.load_recipe(RECIPES / f"smollm2-ksa-stage{i}.yaml") for i in (1, 2, 3)]
    for before, after in zip(cpu, cpu[1:]):
        assert after.model.init_from == before.run.out_dir


@pytest.fixture(scope="module")
def smollm2_checkpoint(module_tmp):
    from keel.checkpoint.hf import import_hf
    return import_hf("smollm2", module_tmp / "ckpt")


@torch.no_grad()
def heldout_ce(model, batches) -> tuple[float, float]:
    """(KSA CE, dense CE) per token on held-out batches; dense = the same weights without summaries."""
    model.eval()
    ksa = dense = count = 0.0
    for b in batches:
        ksa += float(model(b["input_ids"], labels=b["labels"], positions=b["positions"], doc_ids=b["doc_ids"]))
        h = model.dense_hidden_states(b["input_ids"], b["positions"], b["doc_ids"])
        logits = torch.nn.functional.linear(h, model.head_weight()).float()
        dense += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((b["labels"] != IGNORE_INDEX).sum())
    return ksa / count, dense / count


def test_stage1_distillation_closes_the_gap_to_dense_smollm2(smollm2_checkpoint, tmp_path):
    """Stage 1 from the real SmolLM2-135M on the KJV (window 2 chunks of 8 = 16 tokens, context 96):
    3 steps lower the held-out KSA loss towards the dense model's, while every non-summary weight
    stays bit-identical to SmolLM2 (so the dense model, the teacher, is unchanged)."""
    from keel.checkpoint.model_io import load_model
    from keel.train.trainer import Trainer

    cfg = keel.load_recipe(RECIPES / "smollm2-ksa-stage1.yaml", [
        f"run.out_dir={tmp_path / 'run'}", f"model.init_from={smollm2_checkpoint}", "model.chunk_size=8",
        "model.window_chunks=2", "data.seq_len=96", "train.steps=3", "train.micro_batch=2",
        "train.global_batch=2", "train.eval_every=0", "train.eval_batches=2", "train.sample_tokens=0",
        "optim.warmup_steps=0", "logging.progress=false", "logging.wandb=disabled"])
    trainer = Trainer(cfg)
    eval_batches = trainer.data.eval_batches(2, 2, 0, 1)
    ksa_before, dense_before = heldout_ce(trainer.model, eval_batches)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items() if is_summary_param(k)}
    trainer.train()
    ksa_after, dense_after = heldout_ce(trainer.model, eval_batches)
    print(f"\nheld-out CE: dense {dense_before:.4f}; KSA {ksa_before:.4f} -> {ksa_after:.4f}")
    assert dense_after == dense_before  # the teacher did not move
    assert ksa_before - dense_before > 0.05  # summaries start out costing something...
    # ...and 3 distillation steps win part of it back (measured, reference init and loss: gap 1.00 -> 0.57 nats).
    assert ksa_after - dense_after < 0.9 * (ksa_before - dense_before)

    dense_sd = load_model(smollm2_checkpoint).state_dict()
    trained = trainer.model.state_dict()
    assert set(trained) == set(dense_sd) | set(start)
    for name, value in dense_sd.items():
        assert torch.equal(trained[name], value), name
    # Every summary parameter trained, except the last layer's summary queries: their output only
    # reaches summary positions of the last layer, which are dropped before the LM head (no gradient).
    last = f"layers.{cfg.model.n_layers - 1}.attention.wq_summary.weight"
    assert [k for k in start if torch.equal(trained[k], start[k])] == [last]
