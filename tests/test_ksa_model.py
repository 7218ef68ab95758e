"""KSA model (docs/ksa.md): the mask rule, attention cores, summary insertion/removal, cached decode,
stage-1 distillation and conversion from a dense model."""
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import keel
from keel.data.assets import corpus_files
from keel.errors import ConfigError, KeelError
from keel.model.backbone import TransformerConfig
from keel.model.ksa import (KSAConfig, expanded_layout, is_summary_param, ksa_from_dense,
                            summary_attention_mask, text_positions_in_expanded)
from keel.model.ksa_attention import KSA_ATTENTION_IMPLS, KSAMask
from keel.model.registry import build_model

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def brute_force_mask(L, N, S, W):
    """The mask rule of docs/ksa.md#attention-pattern written out position by position (independent of
    keel's vectorised rule)."""
    B = N + S
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(q + 1):
            cq, ck = q // B, k // B
            q_is_summary, k_is_summary = q % B >= N, k % B >= N
            if q_is_summary:
                mask[q, k] = cq == ck
            elif not k_is_summary:
                mask[q, k] = cq - ck <= W
            else:
                mask[q, k] = cq - ck > W
    return mask


def test_mask_matches_brute_force_rule():
    rng = random.Random(0)
    for _ in range(40):
        N, S, W = rng.randint(1, 6), rng.randint(1, 3), rng.randint(0, 4)
        L = rng.randint(1, 70)
        assert torch.equal(summary_attention_mask(L, N, S, W), brute_force_mask(L, N, S, W)), (L, N, S, W)
    # N=2, S=1, W=1: text t6 (chunk 2) sees chunks 1-2 text and chunk 0's summary, not chunk 1's.
    m = summary_attention_mask(9, 2, 1, 1)
    assert m[6].tolist() == [False, False, True, True, True, False, True, False, False]
    assert m[5].tolist() == [False, False, False, True, True, True, False, False, False]  # summary of chunk 1


def reference_attention(q, k, v, mask):
    """Plain softmax attention with a boolean [B|1, 1, L, L] mask and GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("with_docs", [False, True])
def test_dense_and_flex_cores_match_softmax_reference(with_docs):
    torch.manual_seed(0)
    for N, S, W, L in [(4, 1, 2, 77), (3, 2, 0, 64), (8, 1, 1, 130)]:
        q = torch.randn(2, 4, L, 16)
        k, v = torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
        docs = None
        mask = summary_attention_mask(L, N, S, W)[None, None]
        if with_docs:  # packed documents: a second document starts mid-chunk in row 0
            docs = torch.zeros(2, L, dtype=torch.long)
            docs[0, L // 3:] = 1
            mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])
        want = reference_attention(q, k, v, mask)
        for impl in ("dense", "flex"):
            got = KSA_ATTENTION_IMPLS[impl](q, k, v, KSAMask(N, S, doc_ids=docs), W)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{impl} {(N, S, W, L)}")


TRITON_MODEL_CHECK = """
import torch
from keel.model.ksa import KSAConfig
from keel.model.registry import build_model
torch.manual_seed(0)
cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=3,
           summary_tokens=2, window_chunks=1, layer_pattern=["ksa", "full"])
ids = torch.randint(0, 97, (2, 20))
docs, pos = torch.tensor([[0] * 8 + [1] * 12, [0] * 20]), torch.arange(20).expand(2, 20)
results = []
for impl in ("dense", "triton"):
    torch.manual_seed(1)
    model = build_model(KSAConfig(**cfg, ksa_attention=impl))
    model.init_weights()
    loss = model(ids, labels=ids, positions=pos, doc_ids=docs)
    loss.backward()
    results.append((loss.detach(), model.layers["0"].attention.wk_summary.weight.grad))
(a, ga), (b, gb) = results
torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
print("triton model ok")
"""


def test_triton_impl_plugs_into_the_model():
    """model.ksa_attention: triton runs keel/kernels' kernel (Triton's CPU interpreter here) and trains
    like the dense core; without the kernel it is a ConfigError."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        q = torch.randn(1, 1, 6, 8)
        with pytest.raises(KeelError):
            KSA_ATTENTION_IMPLS["triton"](q, q, q, KSAMask(2, 1), 1)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # must precede the triton import
    proc = subprocess.run([sys.executable, "-c", TRITON_MODEL_CHECK], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "triton model ok" in proc.stdout, proc.stderr[-3000:]


def test_layout_helpers():
    N, S, T = 3, 2, 11
    text_index, is_summary = expanded_layout(T, N, S)
    cols = text_positions_in_expanded(T, N, S)
    expanded = []  # ("t", j) or ("s", the text index whose RoPE position the summary takes)
    for j in range(T):
        expanded.append(("t", j))
        if (j + 1) % N == 0:  # summary s of chunk i at i*N + (s+1)*N//S - 1 (the reference's spread)
            i = j // N
            expanded += [("s", i * N + max((s + 1) * N // S - 1, 0)) for s in range(S)]
    assert is_summary.tolist() == [kind == "s" for kind, _ in expanded]
    assert text_index.tolist() == [j for _, j in expanded]
    assert cols.tolist() == [i for i, (kind, _) in enumerate(expanded) if kind == "t"]


def tiny_ksa(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=3,
                    summary_tokens=2, window_chunks=1, qk_norm=True, layer_pattern=["ksa", "ksa", "ksa", "full"],
                    max_seq_len=256)
    settings.update(overrides)
    cfg = KSAConfig(**settings)
    cfg.validate()
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # summary parameters different from their base copies, so mistakes show
        for name, p in model.named_parameters():
            if is_summary_param(name):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_summary_positions_and_removal():
    model = tiny_ksa()
    N, S, T = 3, 2, 10
    ids = torch.randint(0, 97, (2, T))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10, 20))])
    h, exp_pos, layout = model._expand(ids, positions, None)
    want = []
    for b in range(2):
        row = []
        for j in range(T):
            row.append(int(positions[b, j]))
            if (j + 1) % N == 0:  # N=3, S=2: the summaries take the chunk's text offsets 0 and 2
                row += [int(positions[b, j - N + 1 + (s + 1) * N // S - 1]) for s in range(S)]
        want.append(row)
    assert exp_pos.tolist() == want
    assert torch.equal(h[:, layout.text_cols], model.tok_embeddings(ids))
    assert torch.equal(h[:, layout.summary_cols], model.summary_embedding.weight.repeat(T // N, 1).expand(2, -1, -1))
    # Logits come back for text positions only, and the loss is CE on exactly those: none on summaries.
    labels = torch.randint(0, 97, (2, T))
    labels[0, :4] = -100
    with torch.no_grad():
        logits = model(ids, positions=positions)
        loss = model(ids, labels=labels, positions=positions)
    assert logits.shape == (2, T, 97)
    want_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)


def test_packed_documents_match_separate_documents():
    """Packed [A | B] with doc_ids and restarting positions: with len(A) a multiple of N the chunk grid
    of B is its own, so each document's logits equal running it alone; with a mid-chunk boundary,
    nothing crosses documents."""
    model = tiny_ksa(window_chunks=1)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 14))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 9 + [1] * 14])
    positions = torch.tensor([list(range(9)) + list(range(14))])
    with torch.no_grad():
        together = model(packed, positions=positions, doc_ids=docs)
        torch.testing.assert_close(together[:, :9], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 9:], model(b), atol=1e-5, rtol=1e-5)
        # Boundary inside a chunk (text 7 of chunk 2): changing A leaves B's logits untouched.
        docs2 = torch.tensor([[0] * 7 + [1] * 16])
        pos2 = torch.tensor([list(range(7)) + list(range(16))])
        base = model(packed, positions=pos2, doc_ids=docs2)
        other = packed.clone()
        other[0, :7] = torch.randint(0, 97, (7,))
        changed = model(other, positions=pos2, doc_ids=docs2)
    torch.testing.assert_close(changed[:, 7:], base[:, 7:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[:, :7], base[:, :7])


def test_cached_decode_equals_full_forward():
    """Batch of left-padded prompts, a hybrid KSA/full model with per-layer windows; step-by-step logits
    (prefill, then one token at a time past many chunk boundaries and the window) equal the full forward."""
    model = tiny_ksa(layer_pattern=["ksa", "full", "ksa", "ksa"], layer_windows=[1, 1, 2, 3],
                     summary_private=["wo", "attention_norm"])
    torch.manual_seed(1)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 13, 1)]
    steps = 22
    continuation = torch.randint(0, 97, (3, steps))
    longest = max(map(len, prompts))
    ids = torch.zeros(3, longest, dtype=torch.long)
    valid = torch.zeros(3, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    cache = model.new_kv_cache(3, longest + steps)
    with torch.no_grad():
        cache.append_valid(valid)
        stepped = [model(ids, cache=cache)]
        for t in range(steps):
            cache.append_valid(torch.ones(3, 1, dtype=torch.bool))
            stepped.append(model(continuation[:, t:t + 1], cache=cache))
        stepped = torch.cat(stepped, 1)
        for i, p in enumerate(prompts):
            full = model(torch.cat([torch.tensor(p), continuation[i]])[None])[0]
            torch.testing.assert_close(stepped[i, longest - len(p):], full, atol=1e-5, rtol=1e-5)
    # The cache is O(W*N + n*S/N) per KSA layer: a text ring of (W+1)*N - 1 (+1 trash slot) and the
    # summary store (+1), not the expanded length. (A ring one slot smaller fails the comparison above.)
    max_len = longest + steps
    for i, slots in cache.entries_per_layer().items():
        w = model.layers[str(i)].attention.window_chunks
        assert slots == (w + 1) * 3 - 1 + 1 + (max_len // 3) * 2 + 1
    # generate() drives the same cache: greedy tokens equal argmax over full forwards.
    out = model.generate(prompts, max_new_tokens=8)
    with torch.no_grad():
        for p, got in zip(prompts, out.tokens):
            seq = list(p)
            for _ in range(8):
                seq.append(int(model(torch.tensor(seq)[None])[0, -1].argmax()))
            assert got == seq[len(p):]


def test_window_covering_everything_is_the_dense_model():
    """With W >= #chunks no text token ever sees a summary, so KSA == the dense model it came from."""
    torch.manual_seed(0)
    dense_cfg = TransformerConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64)
    dense = build_model(dense_cfg)
    dense.init_weights()
    ksa = ksa_from_dense(dense.state_dict(), KSAConfig(**{**vars(dense_cfg), "name": "ksa"}, chunk_size=4,
                                                        window_chunks=100, ksa_stage="distill"))
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ksa(ids), dense(ids), atol=1e-5, rtol=1e-5)
    # ...and the distillation loss reduces to CE (KL = 0, attention MSE = 0).
    ksa.train()
    torch.testing.assert_close(ksa(ids[:, :-1], labels=ids[:, 1:]), dense(ids[:, :-1], labels=ids[:, 1:]),
                               atol=1e-3, rtol=1e-5)


@pytest.fixture(scope="module")
def kjv_bytes():
    """Real KJV text as bytes (vocab 256 keeps a CPU test fast), split into train and held-out rows."""
    text = corpus_files("kjv")[0].read_text()[:200000]
    ids = torch.tensor(list(text.encode()))
    rows = ids[:(ids.numel() // 129) * 129].view(-1, 129)
    return rows[:-16], rows[-16:]


@pytest.fixture(scope="module")
def dense_kjv_model(kjv_bytes):
    """A tiny dense Llama trained briefly on the KJV: the model stage 1 starts from."""
    from keel.train.config import OptimConfig
    from keel.train.optim import build_optimizer

    train, _ = kjv_bytes
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = build_model(cfg)
    model.init_weights()
    opt, _ = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, schedule="constant"), 40)
    for _ in range(40):
        batch = train[torch.randint(0, len(train), (8,))]
        (model(batch[:, :-1], labels=batch[:, 1:]) / batch[:, 1:].numel()).backward()
        opt.step()
        opt.zero_grad()
    return cfg, model


def test_stage1_distillation_trains_only_summary_parameters(kjv_bytes, dense_kjv_model):
    from keel.train.config import OptimConfig
    from keel.train.optim import build_optimizer

    train, held = kjv_bytes
    dense_cfg, dense = dense_kjv_model
    cfg = KSAConfig(**{**vars(dense_cfg), "name": "ksa"}, chunk_size=4, summary_tokens=1, window_chunks=1,
                    ksa_stage="distill")
    torch.manual_seed(0)  # the summary embedding's initial noise, and the batches below
    model = ksa_from_dense(dense, cfg).train()
    # Converted from the dense model: its weights, and the teacher path is exactly the dense model.
    with torch.no_grad():
        torch.testing.assert_close(F.linear(model.dense_hidden_states(held[:, :-1]), model.head_weight()),
                                   dense(held[:, :-1]), atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_summary_param(n)}
    assert "summary_embedding.weight" in trainable and "layers.0.attention.wq_summary.weight" in trainable
    assert not any("summary" in n for n, _ in model.layers["3"].named_parameters())  # a full layer

    def held_out():
        """(distillation loss per token, KL(teacher || student) per token) on held-out KJV rows."""
        with torch.no_grad():
            loss = float(model(held[:, :-1], labels=held[:, 1:])) / held[:, 1:].numel()
            weight = model.head_weight()
            student = F.linear(model.run_layers(held[:, :-1]), weight).log_softmax(-1).flatten(0, 1)
            teacher = F.linear(model.dense_hidden_states(held[:, :-1]), weight).log_softmax(-1).flatten(0, 1)
            return loss, float(F.kl_div(student, teacher, log_target=True, reduction="batchmean"))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start_loss, start_kl = held_out()
    opt, _ = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, schedule="constant"), 25)
    for step in range(25):
        batch = train[torch.randint(0, len(train), (8,))]
        (model(batch[:, :-1], labels=batch[:, 1:]) / batch[:, 1:].numel()).backward()
        if step == 0:
            assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
        opt.step()
        opt.zero_grad()
    end_loss, end_kl = held_out()
    print(f"\nheld-out loss {start_loss:.3f} -> {end_loss:.3f}, KL {start_kl:.3f} -> {end_kl:.3f} per token")
    # Measured (seed 0, summary_init reference, per-element MSE clamp): loss 6.136 -> 3.179, KL 0.496 -> 0.030.
    assert end_loss < start_loss - 0.1, (start_loss, end_loss)
    assert end_kl < 0.5 * start_kl, (start_kl, end_kl)
    # The last KSA layer's summary queries only shape summary outputs no later KSA layer reads, so
    # their projection gets an exactly-zero gradient; every other summary parameter must move.
    dead = "layers.2.attention.wq_summary.weight"
    for name, p in model.named_parameters():
        if name == dead:
            assert torch.equal(p, before[name])
        elif name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("summary_init", ["reference", "copy"])
def test_init_from_dense_checkpoint_initialises_summary_weights(tmp_path, summary_init):
    from keel.errors import CheckpointError
    from keel.checkpoint.dcp import load_model_weights
    from keel.checkpoint.model_io import write_model_checkpoint

    torch.manual_seed(0)
    dense_cfg = TransformerConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64)
    dense = build_model(dense_cfg)
    dense.init_weights()
    write_model_checkpoint(tmp_path / "dense", dense_cfg, dense.state_dict())
    cfg = KSAConfig(**{**vars(dense_cfg), "name": "ksa"}, chunk_size=4, summary_init=summary_init)
    model = build_model(cfg, "meta")  # as the Trainer does for model.init_from
    model.to_empty(device="cpu")
    model.init_buffers()
    load_model_weights(tmp_path / "dense", model)
    state = model.state_dict()
    for name, value in dense.state_dict().items():
        assert torch.equal(state[name], value), name
    summary = state["summary_embedding.weight"]
    table = dense.tok_embeddings.weight.detach()
    if summary_init == "copy":
        for name in state:
            if is_summary_param(name) and name != "summary_embedding.weight":
                assert torch.equal(state[name], state[name.replace("_summary", "")]), name
        # mean token embedding + noise of the table's std
        assert float((summary - table.mean(0)).std()) == pytest.approx(float(table.std()), rel=0.5)
    else:  # the official code: xavier-uniform summary q/k/v, summary embedding N(0, 0.02)
        w = state["layers.0.attention.wk_summary.weight"]
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
        assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.2)
        assert not torch.equal(w, state["layers.0.attention.wk.weight"])
        assert float(summary.mean().abs()) < 0.01 and float(summary.std()) == pytest.approx(0.02, rel=0.3)
    # A checkpoint missing non-summary weights (fewer layers) is still an error naming them.
    small = build_model(TransformerConfig(**{**vars(dense_cfg), "n_layers": 2}))
    small.init_weights()
    write_model_checkpoint(tmp_path / "small", small.config, small.state_dict())
    with pytest.raises(CheckpointError, match="layers.2"):
        load_model_weights(tmp_path / "small", model)


@pytest.mark.parametrize("override, key", [
    ("model.chunk_size=0", "model.chunk_size"),
    ("model.layer_pattern=[ksa,dense]", "model.layer_pattern"),
    ("model.ksa_attention=cuda", "model.ksa_attention"),
    ("model.ksa_stage=distil", "model.ksa_stage"),
    ("model.summary_private=[wq]", "model.summary_private"),
    ("model.window_chunk=4", "model.window_chunk"),
    ("parallel.pp=2", "parallel.pp"),  # KSA has no pipeline stages yet
])
def test_bad_config_is_a_config_error_naming_the_key(tiny_recipe, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        keel.load_recipe(tiny_recipe, ["model.name=ksa", override])


def test_recipe_picks_the_ksa_family(tiny_recipe):
    cfg = keel.load_recipe(tiny_recipe, ["model.name=ksa", "model.chunk_size=4", "model.ksa_stage=distill"])
    assert isinstance(cfg.model, KSAConfig) and cfg.model.chunk_size == 4 and cfg.model.ksa_stage == "distill"
