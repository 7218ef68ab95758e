"""KSA under tensor parallelism (keel/model/ksa.py KSA_TP_PLAN): the summary projections split like the
base ones. A tiny KSA on the real tiny recipe's text; CPU, gloo; tolerances of tests/conftest.py."""
import pytest

from conftest import TINY_RECIPE, assert_same_training, keel_refusal, run_keel, small_run_overrides

# Two layers, the first KSA (16-token chunks, one summary token, a 2-chunk window), the second full;
# every parameter trains (the summary projections among them).
KSA = {"model.name": "ksa", "model.chunk_size": 16, "model.summary_tokens": 1, "model.window_chunks": 2,
       "model.layer_pattern": "[ksa,full]", "model.ksa_attention": "dense", "data.document_mask": False,
       "train.steps": 5}


@pytest.mark.distributed
def test_ksa_under_tp2_equals_one_process(tmp_path):
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "single", **KSA)])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(
        tmp_path / "tp2", **KSA, **{"parallel.tp": 2, "parallel.sequence_parallel": False})], nproc=2)
    assert_same_training(tmp_path / "single", tmp_path / "tp2")


@pytest.mark.parametrize("overrides, message", [
    ({"parallel.tp": 2}, "parallel.sequence_parallel: the ksa family's blocks cannot run on sequence shards"),
    ({"parallel.tp": 2, "parallel.sequence_parallel": False, "model.qk_norm": True, "model.ksa_stage": "distill"},
     "parallel.tp: KSA distillation (model.ksa_stage distill) with model.qk_norm does not yet match"),
    ({"parallel.cp": 2}, "parallel.cp: the ksa family does not support it yet"),
])
def test_ksa_layouts_not_supported_yet_are_one_line_errors(tmp_path, overrides, message):
    assert message in keel_refusal(["train", TINY_RECIPE, *small_run_overrides(tmp_path, **KSA, **overrides)])
