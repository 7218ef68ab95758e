"""S²GR on the real MovieLens-100K: a CoBa RQ-VAE table from `keel sid build`, the alignment tables
recounted from it, a short `keel train` whose loss falls and whose validation ranks items, bad inputs."""
import numpy as np
import pytest

from conftest import REPO, keel_refusal, read_metrics, run_keel
from keel.model.s2gr_task import alignment_tables
from keel.model.semantic_ids import SidTable

S2GR = str(REPO / "recipes/recsys/s2gr-tiny.yaml")


def small(out_dir, table, **extra) -> list[str]:
    settings = {"run.out_dir": str(out_dir), "recsys.sid_table": str(table), "model.dim": 32, "model.n_heads": 2,
                "model.d_feature": 8, "recsys.context_len": 20, "train.micro_batch": 64, "train.global_batch": 64,
                "train.steps": 60, "train.eval_every": 60, "train.log_every": 10, "optim.warmup_steps": 5,
                "checkpoint.every": 0, "logging.wandb": "disabled", "logging.progress": False,
                "recsys.eval_beam": 16, "recsys.eval_topk": "[5,10]"}
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def coba_table(module_tmp):
    path = module_tmp / "coba.npz"
    out = run_keel(["sid", "build", S2GR, f"recsys.sid_table={path}", "recsys.sid.vae.steps=400"]).stdout
    assert str(path) in out
    return path


def test_alignment_tables_recount(coba_table):
    table = SidTable.load(coba_table)
    assert len(table.codebooks) == 3 and all(c.shape == (32, table.codebooks[0].shape[1]) for c in table.codebooks)
    centres, clusters, vectors = alignment_tables(table, 8, seed=0)
    assert centres.shape == (3, 8, table.codebooks[0].shape[1]) and clusters.shape == (1683, 3)
    for item in (1, 50, 1682):
        want = sum(table.codebooks[level][table.sids[item, level]] for level in range(3))
        np.testing.assert_allclose(vectors[item], want, rtol=1e-6)
        for level in range(3):  # each code's coarse cluster is its nearest centre
            code = table.codebooks[level][table.sids[item, level]]
            nearest = np.argmin(((centres[level] - code) ** 2).sum(1))
            assert clusters[item, level] == nearest
    assert not vectors[0].any() and not clusters[0].any()


def test_s2gr_loss_falls_and_validation_ranks(coba_table, tmp_path):
    run_keel(["train", S2GR, *small(tmp_path, coba_table)])
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2]), losses  # with the auxiliary terms
    final = rows[-1]
    uniform = np.mean(np.log(SidTable.load(coba_table).sid_levels))  # NTP of a model that knows nothing
    print(f"eval NTP {final['eval_ntp']:.3f} vs uniform {uniform:.3f}; loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    assert final["eval_ntp"] < 0.85 * uniform  # measured 0.80 of it after these 60 steps
    assert 0.0 <= final["eval_ndcg@10"] <= final["eval_hr@10"] <= 1.0
    assert final["eval_hr@10"] > 10 / 1682  # above a random ranking's expectation


def test_bad_inputs_are_one_line(coba_table, tmp_path):
    line = keel_refusal(["train", S2GR, *small(tmp_path, coba_table, **{"model.s2gr.align_clusters": 64})])
    assert "model.s2gr.align_clusters: 64 coarse clusters" in line
    assert "model.architecture" in keel_refusal(
        ["train", S2GR, *small(tmp_path, coba_table, **{"model.architecture": "lazy_decoder"})])
