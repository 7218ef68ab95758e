"""RQ-KMeans semantic IDs on the real MovieLens-100K items (RecBole's copy, read here with numpy).

Bounds measured at seed 0, 20 k-means iterations, 64-d collaborative SVD embeddings of all
100,000 ratings (L2-normalised rows); each bound leaves a margin over the measured value:
  3 x 32          utilisation 1.0/1.0/1.0, collision rate 0.42, recon error 0.300, dedup size 35
  3 x 32 balanced utilisation 1.0 each,    collision rate 0.30, recon error 0.308, last level 52..53
  3 x 16          utilisation 1.0 each,    collision rate 0.75, recon error 0.365
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from keel.errors import ConfigError, DataError, MissingAssetError
from keel.model.item_embeddings import ItemSource, collaborative_embeddings, item_embeddings
from keel.model.semantic_ids import SidTable, balanced_assign, dedup_codes, rq_kmeans

ML100K = Path(importlib.util.find_spec("recbole").origin).parent / "dataset_example" / "ml-100k"


@pytest.fixture(scope="module")
def ml100k():
    """(user_idx, item_idx, n_users, n_items) from ml-100k.inter; ids there are already 1..n."""
    inter = np.loadtxt(ML100K / "ml-100k.inter", delimiter="\t", skiprows=1, dtype=np.int64)
    u, i = inter[:, 0], inter[:, 1]
    return u, i, int(u.max()), int(i.max())


@pytest.fixture(scope="module")
def embeddings(ml100k):
    return collaborative_embeddings(*ml100k, dim=64, seed=0)


@pytest.fixture(scope="module")
def table(embeddings):
    return rq_kmeans(embeddings, levels=3, codebook=32, iters=20, seed=0)


def test_collaborative_embeddings_are_deterministic(ml100k, embeddings):
    assert embeddings.shape == (1683, 64) and not embeddings[0].any()
    assert np.allclose(np.linalg.norm(embeddings[1:], axis=1), 1.0, atol=1e-5)
    src = ItemSource(n_users=ml100k[2], n_items=ml100k[3], user_idx=ml100k[0], item_idx=ml100k[1], svd_dim=64)
    assert np.array_equal(item_embeddings("collaborative", src), embeddings)
    with pytest.raises(ConfigError, match="recsys.sid.embedding: unknown"):
        item_embeddings("random", src)


def test_rq_kmeans_quality_on_ml100k(table):
    r = table.report
    assert table.sids.shape == (1683, 4) and not table.sids[0].any()
    assert table.sid_levels[:3] == [32, 32, 32] and table.sid_levels[3] == r["dedup_size"]
    assert min(r["utilisation"]) >= 0.9
    assert 0.2 <= r["collision_rate"] <= 0.6
    assert r["recon_error"] <= 0.4
    assert 2 <= r["dedup_size"] <= 80
    # de-dup makes every row unique and every code fits its level
    assert np.unique(table.sids[1:], axis=0).shape[0] == 1682
    assert (table.sids < np.asarray(table.sid_levels)).all()


def test_smaller_codebook_collides_more(embeddings, table):
    r = rq_kmeans(embeddings, levels=3, codebook=16, iters=20, seed=0).report
    assert min(r["utilisation"]) >= 0.9 and 0.6 <= r["collision_rate"] <= 0.9
    assert table.report["recon_error"] < r["recon_error"] <= 0.5


def test_seeded_reproducibility(embeddings, table):
    again = rq_kmeans(embeddings, levels=3, codebook=32, iters=20, seed=0)
    assert np.array_equal(again.sids, table.sids) and again.report == table.report
    other = rq_kmeans(embeddings, levels=3, codebook=32, iters=20, seed=1)
    assert not np.array_equal(other.sids, table.sids)


def test_balanced_last_level(embeddings, table):
    bal = rq_kmeans(embeddings, levels=3, codebook=32, iters=20, seed=0, balanced_last=True)
    sizes = np.bincount(bal.sids[1:, 2], minlength=32)
    assert sizes.min() == 1682 // 32 and sizes.max() == 1682 // 32 + 1  # 52 or 53
    assert bal.report["collision_rate"] < table.report["collision_rate"]
    assert bal.report["recon_error"] <= 0.4
    assert np.unique(bal.sids[1:], axis=0).shape[0] == 1682


def test_balanced_assign_and_dedup_codes():
    rng = np.random.default_rng(0)
    for n, k in [(10, 3), (7, 7), (100, 8), (33, 1)]:
        sizes = np.bincount(balanced_assign(rng.random((n, k))), minlength=k)
        assert sizes.min() >= n // k and sizes.max() <= -(-n // k) and sizes.sum() == n
    paths = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 0], [3, 3]])
    assert dedup_codes(paths).tolist() == [0, 0, 1, 2, 1, 0]


def test_bad_settings(embeddings):
    with pytest.raises(ConfigError, match=r"^recsys.sid.codebook: 2000 codes .* 1682 items"):
        rq_kmeans(embeddings, levels=2, codebook=2000)
    with pytest.raises(ConfigError, match="recsys.sid.dedup"):
        rq_kmeans(embeddings, levels=1, codebook=8, dedup=False)


def test_save_load_roundtrip_and_errors(table, tmp_path):
    ids = [""] + [str(i) for i in range(1, 1683)]
    path = table.save(tmp_path / "sid" / "ml-100k.sid.npz")
    assert [p.name for p in path.parent.iterdir()] == ["ml-100k.sid.npz"]  # no temp file left
    back = SidTable.load(path, item_ids=ids)
    assert np.array_equal(back.sids, table.sids) and back.sid_levels == table.sid_levels
    assert back.report == table.report and back.config == table.config
    with pytest.raises(DataError, match="another catalogue") as e:
        SidTable.load(path, item_ids=ids[:-1])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"recsys.sid_table: .*missing.npz does not exist.*keel sid build") as e:
        SidTable.load(tmp_path / "missing.npz")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a keel SID table"):
        SidTable.load(tmp_path / "junk.npz")


def _titles(n):
    """'Toy Story (1995) Animation Children's Comedy' for the first n items of ml-100k.item."""
    lines = (ML100K / "ml-100k.item").read_text(encoding="latin-1").splitlines()
    header = lines[0].split("\t")
    out = []
    for line in lines[1:n + 1]:
        row = dict(zip(header, line.split("\t")))
        title = row["movie_title:token_seq"]
        year = row.get("release_year:token", "")
        genres = row.get("class:token_seq", "")
        out.append(f"{title} ({year}) {genres}".strip())
    return out


def test_content_embeddings_smollm2(tmp_path):
    try:
        from keel.data.assets import asset_path
        asset_path("smollm2")
    except MissingAssetError:
        pytest.skip("SmolLM2 asset not fetched (`keel fetch smollm2`)")
    titles = _titles(20)
    assert titles[0].startswith("Toy Story")
    src = ItemSource(n_users=0, n_items=20, texts=[""] + titles, cache_dir=tmp_path)
    emb = item_embeddings("content", src)
    assert emb.shape == (21, 576) and not emb[0].any()
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb[1:], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[1], emb[2], atol=1e-3)
    assert len(list(tmp_path.glob("*.npy"))) == 1  # cached by the texts' hash
    assert np.array_equal(item_embeddings("content", src), emb)
