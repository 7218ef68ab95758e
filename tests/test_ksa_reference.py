"""KSA choices made to follow the official code (issue 17; docs/ksa.md#choices-where-the-paper-is-silent):
per-element MSE clamp over KSA layers only, whole-row data without document masking, spread summary
positions for S > 1, summary_mix_qkv's schedule, and the large-window decode switch."""
import math
from types import SimpleNamespace

import pytest
import torch

from keel.data.config import DataConfig, DataSource
from keel.data.loader import build_train_data
from keel.data.preprocess import preprocess
from keel.data.tokenizer import Tokenizer
from keel.model.backbone import TransformerConfig
from keel.model.ksa import (
    KSAConfig,
    KSALanguageModelTask,
    is_summary_param,
    summary_mix_coefficient,
)
from keel.model.ksa_distill import distillation_loss
from keel.model.registry import build_model


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=3,
                    summary_tokens=2, window_chunks=1, qk_norm=True, layer_pattern=["ksa", "ksa", "ksa", "full"],
                    max_seq_len=256)
    settings.update(overrides)
    cfg = KSAConfig(**settings)
    cfg.validate()
    model = build_model(cfg)
    model.init_weights()
    return model.eval()


# ------------------------------------------------------------------ 1, 2: the MSE term
def test_mse_is_clamped_per_element_then_averaged():
    """A layer whose mean squared error is far above the clamp still gets gradient from its elements
    below it: the gradient equals d/da of mean(clamp((a_s - a_t)^2, 0, c)) computed by hand."""
    torch.manual_seed(0)
    B, T, D, c = 2, 5, 8, 0.1
    cfg = SimpleNamespace(loss_chunk=1024, distill_ce_weight=0.0, distill_kl_weight=0.0, distill_mse_weight=5.0,
                          distill_mse_clamp=c, distill_mse_rms_norm=False)
    teacher_attn = [torch.randn(B, T, D) for _ in range(2)]
    diffs = [torch.randn(B, T, D) * 0.6 for _ in range(2)]  # mixed: many |d| > sqrt(c), many below
    student_attn = [(t + d).requires_grad_() for t, d in zip(teacher_attn, diffs)]
    for d in diffs:
        assert float(d.pow(2).mean()) > c  # the per-layer mean exceeds the clamp (old form: no gradient)
    hidden = torch.randn(B, T, D)
    labels = torch.randint(0, 11, (B, T))
    labels[0, 0] = -100
    weight = torch.randn(11, D)
    loss = distillation_loss(hidden, hidden, weight, labels, student_attn, teacher_attn, cfg)
    loss.backward()
    keep = (labels != -100)[..., None].float()
    n = int(keep.sum())
    for a_s, d in zip(student_attn, diffs):
        below = (d.pow(2) < c).float()
        # 5 * n * (1 / n_layers) * (1 / (n * D)) * 2 d, on kept tokens and unclamped elements.
        want = 5.0 * n / 2 / (n * D) * 2 * d * below * keep
        torch.testing.assert_close(a_s.grad, want, atol=1e-6, rtol=1e-5)
        assert float(a_s.grad.abs().sum()) > 0
    # The loss value itself: the same per-element form.
    value = sum(float((d.pow(2).clamp(0, c) * keep).sum() / (n * D)) for d in diffs) / 2 * 5.0 * n
    assert float(loss) == pytest.approx(value, rel=1e-5)


def test_rms_norm_before_mse_is_a_key_default_off():
    assert KSAConfig().distill_mse_rms_norm is False
    torch.manual_seed(0)
    cfg = SimpleNamespace(loss_chunk=1024, distill_ce_weight=0.0, distill_kl_weight=0.0, distill_mse_weight=1.0,
                          distill_mse_clamp=100.0, distill_mse_rms_norm=True)
    a_t = torch.randn(1, 4, 8)
    a_s = a_t * 3.0  # the same direction, another scale: zero after the official x / (rms + 1e-6)
    labels = torch.zeros(1, 4, dtype=torch.long)
    h, w = torch.randn(1, 4, 8), torch.randn(3, 8)
    assert float(distillation_loss(h, h, w, labels, [a_s], [a_t], cfg)) == pytest.approx(0.0, abs=1e-8)
    cfg.distill_mse_rms_norm = False
    assert float(distillation_loss(h, h, w, labels, [a_s], [a_t], cfg)) > 1.0


# ------------------------------------------------------------------ 3: KSA layers only
def test_only_ksa_layers_enter_the_distillation_mse():
    model = tiny(layer_pattern=["ksa", "full", "ksa", "full"], ksa_stage="distill",
                 distill_ce_weight=0.0, distill_kl_weight=0.0).train()
    ids = torch.randint(0, 97, (2, 13))
    labels = torch.randint(0, 97, (2, 13))
    student, teacher = [], []
    with torch.no_grad():
        model.run_layers(ids, collect=student)
        model.dense_hidden_states(ids, collect=teacher)
        loss = model(ids, labels=labels)
    assert len(student) == len(teacher) == 2  # layers 0 and 2
    # Independently: each KSA layer's attention output (after wo) at text positions, via hooks.
    outs = {}
    hooks = [model.layers[i].attention.wo.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(o))
             for i in ("0", "2")]
    with torch.no_grad():
        model.dense_hidden_states(ids)
        model.run_layers(ids)
    for h in hooks:
        h.remove()
    _, _, layout = model._expand(ids, None, None)
    per_layer = []
    for i in ("0", "2"):
        t, s = outs[i][0], outs[i][1][:, layout.text_cols]
        per_layer.append(float((s - t).pow(2).clamp(0, 0.1).mean()))
    want = 5.0 * ids.numel() * sum(per_layer) / 2
    assert float(loss) == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------ 4: whole rows, no document mask
DOCS = ["First document, short.", "Second one is a little longer than the first.", "third",
        "A fourth document that spans more than one window of tokens so that packing splits it.", "Fifth."]


def test_document_mask_false_gives_whole_rows_and_plain_causal_loss(tmp_path):
    tok = Tokenizer.load("smollm2")
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"d{i}.txt").write_text(d)
    prefix = preprocess(sorted(folder.iterdir()), tmp_path / "out" / "docs", tok, progress=False)
    assert DataConfig().document_mask is True  # the LM families' default is unchanged

    def batch(document_mask):
        cfg = DataConfig(seq_len=12, sources=[DataSource(path=str(prefix))], eval_fraction=0.0,
                         document_mask=document_mask, shuffle=False)
        data = build_train_data(cfg, tok, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1, seed=0,
                                cache_dir=tmp_path / "cache", progress=False)
        return data.next_step()[0]

    rows, docs = batch(False), batch(True)
    assert torch.equal(rows["input_ids"], docs["input_ids"])
    assert torch.equal(rows["positions"], torch.arange(12).expand(4, 12))
    assert bool((rows["doc_ids"] == rows["doc_ids"][:, :1]).all())
    assert not torch.equal(docs["positions"], rows["positions"])  # the rows do cross documents
    for model in (tiny(vocab_size=tok.vocab_size), build_model(TransformerConfig(
            vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))):
        if not isinstance(model.config, KSAConfig):
            torch.manual_seed(0)
            model.init_weights()
        with torch.no_grad():
            loss = model(rows["input_ids"], labels=rows["labels"], positions=rows["positions"],
                         doc_ids=rows["doc_ids"])
            plain = model(rows["input_ids"], labels=rows["labels"])
            masked = model(docs["input_ids"], labels=docs["labels"], positions=docs["positions"],
                           doc_ids=docs["doc_ids"])
        torch.testing.assert_close(loss, plain, atol=1e-4, rtol=1e-6)
        assert float(masked) != float(plain)


# ------------------------------------------------------------------ 7: summary positions for S > 1
@pytest.mark.parametrize("N, S", [(8, 3), (4, 4), (2, 3), (6, 1)])
def test_summary_positions_follow_the_reference_spread(N, S):
    model = tiny(chunk_size=N, summary_tokens=S)
    T = 5 * N + 1
    positions = torch.arange(T)[None] + 100
    _, exp_pos, layout = model._expand(torch.zeros(1, T, dtype=torch.long), positions, None)
    got = exp_pos[0, layout.summary_cols].view(-1, S)
    for i in range(T // N):
        # muse/layers/summary_utils.py (last_chunk_slice_right): i*N + (s+1)*N//S - 1, at least i*N.
        want = [100 + max(i * N + (s + 1) * N // S - 1, i * N) for s in range(S)]
        assert got[i].tolist() == want
    if S == 1:
        assert got[:, 0].tolist() == [100 + i * N + N - 1 for i in range(T // N)]


def test_cached_decode_equals_full_forward_with_spread_summaries():
    model = tiny(chunk_size=4, summary_tokens=3, layer_pattern=["ksa", "ksa", "full", "ksa"], layer_windows=[1, 2])
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (6, 1)]
    steps = 14
    cont = torch.randint(0, 97, (2, steps))
    longest = max(map(len, prompts))
    ids = torch.zeros(2, longest, dtype=torch.long)
    valid = torch.zeros(2, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    cache = model.new_kv_cache(2, longest + steps)
    with torch.no_grad():
        cache.append_valid(valid)
        out = [model(ids, cache=cache)]
        for t in range(steps):
            cache.append_valid(torch.ones(2, 1, dtype=torch.bool))
            out.append(model(cont[:, t:t + 1], cache=cache))
        out = torch.cat(out, 1)
        for i, p in enumerate(prompts):
            full = model(torch.cat([torch.tensor(p), cont[i]])[None])[0]
            torch.testing.assert_close(out[i, longest - len(p):], full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ 8: summary_mix_qkv
def test_summary_mix_schedule_matches_the_reference_formula():
    cfg = KSAConfig(summary_mix_qkv=True, summary_mix_start_step=10, summary_mix_end_step=30)
    assert [summary_mix_coefficient(cfg, s) for s in (0, 10, 15, 20, 30, 99)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    assert summary_mix_coefficient(KSAConfig(), 1000) == 1.0  # off: the summary projections alone
    same = KSAConfig(summary_mix_qkv=True, summary_mix_start_step=5, summary_mix_end_step=5)
    assert [summary_mix_coefficient(same, s) for s in (5, 6)] == [1.0, 0.0]  # end = max(start + 1, end)


def test_summary_mix_at_the_end_step_is_the_base_projections():
    mixed = tiny(summary_mix_qkv=True, summary_mix_start_step=2, summary_mix_end_step=6)
    ids = torch.randint(0, 97, (2, 14))
    base_like = tiny()  # same seed: same weights; summary q/k/v then replaced by the base ones
    base_like.load_state_dict(mixed.state_dict())
    plain = tiny()
    plain.load_state_dict(mixed.state_dict())
    with torch.no_grad():
        for name, p in base_like.named_parameters():
            if is_summary_param(name) and any(w in name for w in ("wq_summary", "wk_summary", "wv_summary")):
                p.copy_(base_like.get_parameter(name.replace("_summary", "")))
        mixed.set_train_step(6)
        torch.testing.assert_close(mixed(ids), base_like(ids), atol=1e-5, rtol=1e-5)
        mixed.set_train_step(2)
        torch.testing.assert_close(mixed(ids), plain(ids), atol=1e-6, rtol=1e-6)
        mixed.set_train_step(4)  # halfway: neither
        assert not torch.allclose(mixed(ids), plain(ids), atol=1e-4)
        assert not torch.allclose(mixed(ids), base_like(ids), atol=1e-4)
    # The family's task sets the step from the data position before each loss (1-based trainer steps).
    task = KSALanguageModelTask(SimpleNamespace(model=mixed.config, data=SimpleNamespace(document_mask=True)))
    task.data = SimpleNamespace(sampler=SimpleNamespace(consumed_samples=3 * 8, global_batch=8))
    batch = {"input_ids": ids, "labels": ids, "positions": None, "doc_ids": None}
    with torch.no_grad():
        task.loss_sum(mixed, batch)
    assert float(mixed.summary_mix) == 0.75


# ------------------------------------------------------------------ 9: large windows at decode
def test_decode_large_window_as_full_is_full_text_attention_at_decode():
    """With the switch, a layer whose window exceeds the smallest one decodes like a window covering
    everything (all past text, no summaries); without it, decode equals training as before."""
    kw = {"layer_pattern": ["ksa"], "n_layers": 2, "summary_tokens": 1}
    switched = tiny(layer_windows=[1, 2], decode_large_window_as_full=True, **kw)
    wide = tiny(layer_windows=[1, 100], **kw)
    wide.load_state_dict(switched.state_dict())
    keel_default = tiny(layer_windows=[1, 2], **kw)
    keel_default.load_state_dict(switched.state_dict())
    assert KSAConfig().decode_large_window_as_full is False
    torch.manual_seed(4)
    seq = torch.randint(0, 97, (1, 30))

    def decode(model):
        cache = model.new_kv_cache(1, 30)
        with torch.no_grad():
            out = [model(seq[:, :5], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(5, 30)]
        return torch.cat(out, 1)

    with torch.no_grad():
        torch.testing.assert_close(decode(switched), wide(seq), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode(keel_default), keel_default(seq), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(wide(seq), keel_default(seq), atol=1e-4)
    assert math.isfinite(float(decode(switched).sum()))
