"""keel.data: tokenization, the indexed format, packing, blending, sampling, SFT and bad inputs.

Uses the real fetched SmolLM2 tokenizer and Shakespeare corpus found through keel.data.assets
($KEEL_HOME); everything else is small synthetic text written into tmp_path.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from keel.data.config import DataConfig, DataSource
from keel.data.assets import corpus_files
from keel.data.blend import BlendedDataset
from keel.data.loader import build_train_data, collate
from keel.data.packed import PackedDataset, megatron_indexed, open_indexed, split_documents
from keel.data.preprocess import preprocess, preprocess_main, resolve_source
from keel.data.sampler import GlobalBatchSampler
from keel.data.sft import SFTDataset
from keel.data.tokenizer import Tokenizer
from keel.errors import ConfigError, DataError

DOCS = [
    "First document.\nIt has two lines.",
    "Second: ünïcödé text ✓ — with dashes",
    "third",
    "A fourth, somewhat longer document that spans more than one window of tokens "
    "so that packing has to split it across samples and continue its positions.",
    "Fifth and last.",
]


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    # Found through $KEEL_HOME by keel.data.assets; a missing asset fails with a MissingAssetError
    # that names the folder it looked in and the `keel fetch` command that creates it.
    return Tokenizer.load("smollm2")


def write_txt(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return [folder / f"doc{i:02d}.txt" for i in range(len(docs))]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def prefix(tmp_path, tok) -> Path:
    return preprocess(write_txt(tmp_path / "txt", DOCS), tmp_path / "out" / "docs", tok, progress=False)


# ---------------------------------------------------------------- tokenizer and preprocessing

def test_tokenizer_roundtrip_save_and_load(tmp_path, tok):
    assert tok.vocab_size == len(tok.hf) and tok.eos_id is not None and tok.pad_id is not None
    ids = tok.encode(DOCS[1])
    assert tok.eos_id not in ids and tok.decode(ids) == DOCS[1]  # no special tokens unless asked
    assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    if tok.bos_id is not None:
        assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
    tok.save(tmp_path / "tk")
    again = Tokenizer.load(str(tmp_path / "tk"))
    assert again.encode(DOCS[3]) == tok.encode(DOCS[3]) and again.eos_id == tok.eos_id
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(DataError, match=str(bad)):
            Tokenizer.load(str(bad))


def test_preprocess_roundtrip_txt_and_jsonl(tmp_path, tok):
    txt = write_txt(tmp_path / "in", DOCS[:2])
    jl = write_jsonl(tmp_path / "in" / "more.jsonl", [{"text": DOCS[2], "id": 7}, "", {"text": DOCS[3]}])
    out = preprocess(txt + [jl], tmp_path / "out" / "ds", tok, progress=False)
    ds = open_indexed(out)
    assert ds.index.dtype == np.int32
    assert len(ds.document_indices) - 1 == len(ds) == 4  # blank jsonl line is not a document
    for i, doc in enumerate(DOCS[:4]):
        ids = ds.get(i).tolist()
        assert ids == tok.encode(doc) + [tok.eos_id]
        assert tok.decode(ids[:-1]) == doc
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx"]  # no debris


def test_preprocess_is_atomic_on_error(tmp_path, tok):
    good = write_txt(tmp_path / "in", DOCS[:2])
    bad = write_jsonl(tmp_path / "in" / "bad.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        preprocess(good + [bad], tmp_path / "out" / "ds", tok, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither final nor temporary files remain


def test_preprocess_main_reports_counts(tmp_path, tok, capsys):
    folder = tmp_path / "in"
    write_txt(folder, DOCS)
    out = preprocess_main([str(folder)], str(tmp_path / "cli"), "smollm2", "text")
    n_tokens = sum(len(tok.encode(d)) + 1 for d in DOCS)
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{len(DOCS)} documents" in printed and f"{n_tokens} tokens" in printed


# ---------------------------------------------------------------- packing

def test_packed_windows_reproduce_stream(prefix, tok):
    seq_len = 8
    stream = np.concatenate([tok.encode(d) + [tok.eos_id] for d in DOCS])
    ds = PackedDataset(prefix, seq_len)
    assert len(ds) == (len(stream) - 1) // seq_len
    samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        assert all(v.dtype == torch.int64 and v.shape == (seq_len,) for v in s.values())
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
    rebuilt = torch.cat([s["input_ids"] for s in samples] + [samples[-1]["labels"][-1:]])
    assert rebuilt.tolist() == stream[:len(ds) * seq_len + 1].tolist()

    # Expected position of stream token t: distance from the token after the previous EOS.
    starts = np.concatenate([[0], np.flatnonzero(stream == tok.eos_id) + 1])
    doc_of = np.searchsorted(starts, np.arange(len(stream)), side="right") - 1
    expected_pos = np.arange(len(stream)) - starts[doc_of]
    positions = torch.cat([s["positions"] for s in samples]).numpy()
    assert positions.tolist() == expected_pos[:len(positions)].tolist()
    for i, s in enumerate(samples):
        pos, doc = s["positions"].numpy(), s["doc_ids"].numpy()
        new_doc = np.diff(doc) != 0
        assert (new_doc == (pos[1:] == 0)).all()  # doc id changes exactly where positions reset
        assert (new_doc == (s["input_ids"].numpy()[:-1] == tok.eos_id)).all()  # ...right after EOS
        assert doc.tolist() == doc_of[i * seq_len:(i + 1) * seq_len].tolist()


def test_packed_document_subset_and_split(prefix, tok):
    train, held = split_documents(prefix, 0.3)
    n_eval = int(np.ceil(0.3 * len(DOCS)))
    assert (train, held) == (range(0, len(DOCS) - n_eval), range(len(DOCS) - n_eval, len(DOCS)))
    assert split_documents(prefix, 0.0001)[1] == range(len(DOCS) - 1, len(DOCS))  # at least one
    assert split_documents(prefix, 0.0)[1] == range(len(DOCS), len(DOCS))
    ds = PackedDataset(prefix, 4, held)
    stream = np.concatenate([tok.encode(d) + [tok.eos_id] for d in DOCS[held.start:]])
    assert ds[0]["input_ids"].tolist() == stream[:4].tolist()
    assert ds[0]["doc_ids"][0].item() == held.start and ds[0]["positions"][0].item() == 0


def test_packed_too_few_tokens(prefix, tok):
    total = sum(len(tok.encode(d)) + 1 for d in DOCS)
    whole = PackedDataset(prefix, total - 1)  # exactly seq_len + 1 tokens: one sample
    assert len(whole) == 1 and whole[0]["labels"][-1].item() == tok.eos_id
    with pytest.raises(DataError, match=rf"{prefix}: .* {total} tokens, fewer than seq_len \+ 1 = {total + 1}"):
        PackedDataset(prefix, total)


# ---------------------------------------------------------------- blending

class Numbered(torch.utils.data.Dataset):
    def __init__(self, source: int, n: int):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"source": self.source, "index": i}


def test_blend_ratios_and_determinism():
    weights = [5.0, 3.0, 2.0]
    datasets = [Numbered(0, 700), Numbered(1, 40), Numbered(2, 1000)]
    size = 4000
    blend = BlendedDataset(datasets, weights, size=size)
    items = [blend[i] for i in range(size)]
    counts = np.bincount([it["source"] for it in items], minlength=3)
    assert np.all(np.abs(counts / size - np.array(weights) / sum(weights)) < 0.01)
    for src, ds in enumerate(datasets):  # each source is read in order, wrapping around
        seen = [it["index"] for it in items if it["source"] == src]
        assert seen == [k % len(ds) for k in range(len(seen))]
    again = BlendedDataset(datasets, weights, size=size)
    assert np.array_equal(again.dataset_index, blend.dataset_index)
    assert np.array_equal(again.sample_index, blend.sample_index)
    assert len(BlendedDataset(datasets, weights)) == 1740
    with pytest.raises(ConfigError):
        BlendedDataset(datasets, [1.0, 0.0, 1.0])


# ---------------------------------------------------------------- sampler

def flat(step):
    return [i for micro in step for i in micro]


def test_sampler_ranks_partition_the_global_batch():
    n, gb, mb = 50, 8, 2
    single = GlobalBatchSampler(n, gb, mb, 0, 1, seed=3)
    for dp in (2, 4):
        ranks = [GlobalBatchSampler(n, gb, mb, r, dp, seed=3) for r in range(dp)]
        assert ranks[0].grad_accum_steps == gb // (mb * dp)
        ref = GlobalBatchSampler(n, gb, mb, 0, 1, seed=3)
        for _ in range(9):  # crosses an epoch boundary
            steps = [s.next_step() for s in ranks]
            assert all(len(st) == gb // (mb * dp) and all(len(m) == mb for m in st) for st in steps)
            assert sum((flat(st) for st in steps), []) == flat(ref.next_step())
    assert flat(single.next_step()) != flat(GlobalBatchSampler(n, gb, mb, 0, 1, seed=4).next_step())


def test_sampler_resume_with_other_dp_size():
    n, gb, k = 37, 8, 3
    two = [GlobalBatchSampler(n, gb, 2, r, 2, seed=11) for r in range(2)]
    for _ in range(k):
        for s in two:
            s.next_step()
    state = two[0].state_dict()
    assert state == two[1].state_dict() == {"consumed_samples": k * gb, "seed": 11}
    resumed = GlobalBatchSampler(n, gb, 2, 0, 1, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert resumed.grad_accum_steps == 2 * two[0].grad_accum_steps
    straight = GlobalBatchSampler(n, gb, 2, 0, 1, seed=11)
    for _ in range(k):
        straight.next_step()
    for _ in range(6):
        assert resumed.next_step() == straight.next_step()


def test_sampler_epochs_are_fresh_permutations():
    n, gb = 12, 4
    s = GlobalBatchSampler(n, gb, 2, 0, 1, seed=0)
    order = sum((flat(s.next_step()) for _ in range(3 * n // gb)), [])
    epochs = [order[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))  # every sample once per epoch, no repeats
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    plain = GlobalBatchSampler(n, gb, 2, 0, 1, seed=0, shuffle=False)
    assert sum((flat(plain.next_step()) for _ in range(n // gb)), []) == list(range(n))


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="train.global_batch"):
        GlobalBatchSampler(100, 12, 4, 0, 2, seed=0)


# ---------------------------------------------------------------- SFT

def test_sft_prompt_response_masking(tmp_path, tok):
    records = [{"prompt": "Question: what is two plus two?\nAnswer:", "response": " four"},
               {"prompt": "Say hi.", "response": " Hello there, friend!"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    seq_len = 24
    ds = SFTDataset(path, tok, seq_len)
    assert len(ds) == 2
    for rec, sample in zip(records, (ds[0], ds[1])):
        p, r = tok.encode(rec["prompt"]), tok.encode(rec["response"]) + [tok.eos_id]
        n = len(p) + len(r) - 1
        labels = sample["labels"].tolist()
        assert labels[:len(p) - 1] == [-100] * (len(p) - 1)  # predicting prompt tokens: masked
        assert labels[len(p) - 1:n] == r  # predicting response tokens and EOS: trained
        assert labels[n:] == [-100] * (seq_len - n)  # padding
        assert sample["input_ids"][:n].tolist() == (p + r)[:-1]
        assert (sample["doc_ids"][:n] == 0).all() and (sample["doc_ids"][n:] != 0).all()
        assert sample["positions"][:n].tolist() == list(range(n))
    short = SFTDataset(path, tok, 4)[0]
    assert short["input_ids"].tolist() == tok.encode(records[0]["prompt"])[:4]


def test_sft_messages_use_chat_template(tmp_path, tok):
    assert tok.chat_template, "the SmolLM2 tokenizer ships a chat template"
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ds = SFTDataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}]), tok, 128)
    labels = ds[0]["labels"]
    trained = tok.decode(labels[labels != -100])
    assert "Blue." in trained and "Green." in trained
    assert "Name a colour." not in trained and "Another?" not in trained
    assert "Name a colour." in tok.decode(ds[0]["input_ids"])


# ---------------------------------------------------------------- bad inputs name the file

def test_bad_sources_raise_data_error_naming_the_file(tmp_path, tok):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"{missing}: data source not found"):
        resolve_source(str(missing), tok, tmp_path / "cache")

    src = preprocess(write_txt(tmp_path / "in", DOCS[:3]), tmp_path / "d" / "ds", tok, progress=False)
    assert resolve_source(str(src), tok, tmp_path / "cache") == src

    lonely = tmp_path / "lonely"
    Path(f"{src}.bin").rename(f"{lonely}.bin")
    with pytest.raises(DataError, match=rf"{lonely}.idx: index file missing"):
        resolve_source(str(lonely), tok, tmp_path / "cache")

    trunc = tmp_path / "trunc"
    Path(f"{lonely}.bin").rename(f"{trunc}.bin")
    data = Path(f"{src}.idx").read_bytes()
    Path(f"{trunc}.idx").write_bytes(data[:len(data) - 5])
    with pytest.raises(DataError, match=rf"{trunc}.idx: truncated or corrupt"):
        resolve_source(str(trunc), tok, tmp_path / "cache")
    Path(f"{trunc}.idx").write_bytes(data[:20])
    with pytest.raises(DataError, match=rf"{trunc}.idx: truncated or corrupt"):
        resolve_source(str(trunc), tok, tmp_path / "cache")

    foreign = tmp_path / "foreign"  # tokenized with a bigger vocabulary than ours
    builder = megatron_indexed().IndexedDatasetBuilder(f"{foreign}.bin", dtype=np.int32)
    builder.add_item(torch.tensor([5, tok.vocab_size + 7, tok.eos_id]))
    builder.end_document()
    builder.finalize(f"{foreign}.idx")
    with pytest.raises(DataError, match=rf"{foreign}.bin: token id {tok.vocab_size + 7} >= "):
        resolve_source(str(foreign), tok, tmp_path / "cache")


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"', "not valid JSON"),
    ('{"body": "no text field"}', "missing field 'text'"),
    ('["a", "list"]', "expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, tok, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a good line"}, line])
    with pytest.raises(DataError, match=rf"^{path}:2: {message}"):
        resolve_source(str(path), tok, tmp_path / "cache")


def test_malformed_sft_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, {"question": "?"}])
    with pytest.raises(DataError, match=rf"^{path}:2: expected fields 'prompt' and 'response'"):
        SFTDataset(path, tok, 16)


# ---------------------------------------------------------------- end to end

def test_build_train_data_blends_and_evaluates(tmp_path, tok):
    a = write_txt(tmp_path / "a", [f"Alpha document number {i}. " * (5 + i) for i in range(10)])[0].parent
    b = write_jsonl(tmp_path / "b.jsonl", [{"body": f"Beta line {i} " * 12} for i in range(10)])
    cfg = DataConfig(seq_len=16, sources=[DataSource(str(a), 3.0), DataSource(str(b), 1.0)],
                     text_key="body", eval_fraction=0.2)
    with pytest.raises(DataError, match=rf"{b}:1: missing field 'text'"):  # default text_key
        build_train_data(DataConfig(seq_len=16, sources=[DataSource(str(b))]), tok, global_batch=4,
                         micro_batch=2, dp_rank=0, dp_size=1, seed=0, cache_dir=tmp_path / "c")
    ranks = [build_train_data(cfg, tok, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2, seed=1,
                              cache_dir=tmp_path / "cache", progress=False) for r in range(2)]
    data = ranks[0]
    assert isinstance(data.train_dataset, BlendedDataset) and data.sampler.grad_accum_steps == 2
    step = data.next_step()
    assert len(step) == 2 and all(b["input_ids"].shape == (2, 16) for b in step)
    assert set(step[0]) == {"input_ids", "labels", "positions", "doc_ids"}
    ev = data.eval_batches(3, 2, 0, 2)
    assert len(ev) == 3 and all(torch.equal(x["input_ids"], y["input_ids"])
                                for x, y in zip(ev, data.eval_batches(3, 2, 0, 2)))
    other = ranks[1].eval_batches(3, 2, 1, 2)
    assert not torch.equal(ev[0]["input_ids"], other[0]["input_ids"])
    # Eval text comes from held-out documents only: the last 2 of 10 in each source.
    eval_text = " ".join(tok.decode(x["input_ids"].flatten()) for x in ev + other)
    assert "Alpha document number 9" in eval_text or "Beta line 9" in eval_text
    assert "number 3." not in eval_text and "Beta line 3 " not in eval_text
    data.load_state_dict({"consumed_samples": 8, "seed": 1})
    assert data.state_dict() == {"consumed_samples": 8, "seed": 1}


def test_build_train_data_sft(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"Q{i}:", "response": f" A{i}"} for i in range(10)])
    cfg = DataConfig(seq_len=12, sources=[DataSource(str(path))], format="sft", eval_fraction=0.1)
    data = build_train_data(cfg, tok, global_batch=3, micro_batch=3, dp_rank=0, dp_size=1, seed=0)
    assert len(data.train_dataset) == 9 and len(data.eval_dataset) == 1
    (batch,) = data.next_step()
    assert batch["labels"].shape == (3, 12) and (batch["labels"] == -100).any()
    assert " A9" in tok.decode(data.eval_batches(1, 1, 0, 1)[0]["input_ids"][0])
    assert collate([data.train_dataset[0]])["input_ids"].shape == (1, 12)


def test_shakespeare_corpus_is_tokenized_once_and_decodes_to_real_text(tmp_path, tok, monkeypatch):
    cache = tmp_path / "cache"
    prefix = resolve_source("corpus:shakespeare", tok, cache, progress=False)
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    stamps = [f.stat().st_mtime_ns for f in files]
    originals = "\n".join(p.read_text(encoding="utf-8") for p in corpus_files("shakespeare"))

    ds = PackedDataset(prefix, 256)
    assert len(ds) > 1000
    for i in (len(ds) // 3, len(ds) - 1):
        text = tok.decode(ds[i]["input_ids"])
        inner = [line.strip() for line in text.split("\n")[1:-1] if len(line.strip()) >= 25]
        assert inner, f"sample {i} has no complete line of text: {text!r}"
        assert all(line in originals for line in inner)

    import keel.data.preprocess as pre

    monkeypatch.setattr(pre, "preprocess", lambda *a, **k: pytest.fail("re-tokenized a cached corpus"))
    assert resolve_source("corpus:shakespeare", tok, cache, progress=False) == prefix
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_prefetcher_hands_out_the_same_steps_and_positions_and_reraises():
    """The background loader gives exactly the wrapped object's steps; its state is the position after
    the last step handed out (not after those loaded ahead); a rewind after close() replays exactly;
    an error in the loading thread reaches the training thread."""
    from keel.data.prefetch import Prefetcher

    class Counting:
        def __init__(self, fail_at=None):
            self.position, self.fail_at = 0, fail_at

        def next_step(self):
            if self.position == self.fail_at:
                raise ValueError("bad shard")
            self.position += 1
            return [{"x": torch.tensor([self.position])}]

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, sd):
            self.position = sd["position"]

    data = Prefetcher(Counting(), depth=2)
    assert [data.next_step()[0]["x"].item() for _ in range(3)] == [1, 2, 3]
    assert data.state_dict() == {"position": 3}  # although steps 4 and 5 may be loaded already
    data.close()
    assert data.next_step()[0]["x"].item() == 4  # rewound: nothing loaded ahead is lost
    data.load_state_dict({"position": 1})
    assert data.next_step()[0]["x"].item() == 2
    data.close()
    failing = Prefetcher(Counting(fail_at=1))
    assert failing.next_step()[0]["x"].item() == 1
    with pytest.raises(ValueError, match="bad shard"):
        failing.next_step()
