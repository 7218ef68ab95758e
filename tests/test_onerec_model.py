"""OneRec-V2 lazy decoder (arXiv 2508.20900 §3.3), its Table 2 baselines, SASRec, and their FLOPs counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.attention import AttentionMask
from keel.model.backbone import apply_rope
from keel.model.moe import MoEConfig
from keel.model.onerec import OneRec
from keel.model.onerec_config import ARCHITECTURES, OneRecConfig
from keel.model.rec_flops import compare_architectures, formula_flops_per_sample, training_flops_per_sample
from keel.model.sasrec import SASRec, SASRecConfig

LEVELS = [4, 5, 6]
N_ITEMS = 20


def tiny_config(architecture="lazy_decoder", **overrides) -> OneRecConfig:
    fields = dict(architecture=architecture, dim=32, n_layers=3, n_heads=4, d_feature=8, s_kv=2, l_kv=2, g_kv=2,
                  context_len=12, n_items=N_ITEMS, n_users=5, sid_levels=list(LEVELS),
                  user_features=["age", "gender"], user_feature_sizes=[5, 3], n_gaps=8)
    fields.update(overrides)
    return OneRecConfig(**fields)


def build(cfg, seed=0, cls=OneRec):
    """The model built on meta, then materialised and initialised as the trainer does."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    rows, ctx, k = 3, 6, 2
    items = torch.randint(1, N_ITEMS + 1, (rows, ctx), generator=g)
    items[0, :3] = 0  # a short history, left-padded
    targets = torch.randint(1, N_ITEMS + 1, (rows, k), generator=g)
    targets[1, 1] = 0  # fewer targets left
    sids = torch.stack([torch.randint(0, v, (N_ITEMS + 1,), generator=g) for v in LEVELS], 1)
    sids[0] = 0
    return {"user": torch.arange(1, rows + 1),
            "user_feats": torch.stack([torch.randint(0, 5, (rows,), generator=g),
                                       torch.randint(0, 3, (rows,), generator=g)], 1),
            "ctx_items": items, "ctx_ratings": torch.randint(1, 6, (rows, ctx), generator=g) * (items != 0),
            "ctx_gaps": torch.randint(1, 8, (rows, ctx), generator=g) * (items != 0),
            "targets": targets, "ctx_sids": sids[items], "target_sids": sids[targets]}


@pytest.fixture(scope="module")
def models():
    return {arch: build(tiny_config(arch)) for arch in ARCHITECTURES}


def left_pad(batch, extra):
    out = dict(batch)
    for key in ("ctx_items", "ctx_ratings", "ctx_gaps", "ctx_sids"):
        t = batch[key]
        out[key] = torch.cat([torch.zeros_like(t[:, :1]).expand(-1, extra, *t.shape[2:]), t], 1)
    return out


# ------------------------------------------------------------------ the lazy block
def reference_lazy_block(block, x, k, v, owner, ctx_valid, cfg):
    """The block written out: cross-attention to K/V = the context's KV set as given (no projection),
    GQA by head index, then causal self-attention with RoPE, then the FFN."""
    rows, q_len, _ = x.shape
    n_heads, d_head, group = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.g_kv
    q = (block.cross_norm(x) @ block.cross_attention.wq.weight.T).view(rows, q_len, n_heads, d_head)
    out = torch.zeros(rows, q_len, n_heads, d_head)
    for m in range(rows):
        for h in range(n_heads):
            keys, values = k[owner[m], h // group], v[owner[m], h // group]  # [Lc, D]
            scores = q[m, :, h] @ keys.T / math.sqrt(d_head)
            scores = scores.masked_fill(~ctx_valid[owner[m]], float("-inf"))
            out[m, :, h] = scores.softmax(-1) @ values
    x = x + out.reshape(rows, q_len, -1) @ block.cross_attention.wo.weight.T
    attn = block.attention
    hx = block.attention_norm(x)
    pos = torch.arange(q_len, dtype=torch.float32)
    inv = 1.0 / cfg.backbone_config().rope_theta ** (torch.arange(0, d_head, 2).float() / d_head)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[None].expand(rows, -1, -1)
    sq = apply_rope((hx @ attn.wq.weight.T).view(rows, q_len, n_heads, d_head), ang.cos(), ang.sin())
    sk = apply_rope((hx @ attn.wk.weight.T).view(rows, q_len, n_heads, d_head), ang.cos(), ang.sin())
    sv = (hx @ attn.wv.weight.T).view(rows, q_len, n_heads, d_head)
    scores = torch.einsum("mqhd,mkhd->mhqk", sq, sk) / math.sqrt(d_head)
    scores = scores.masked_fill(torch.ones(q_len, q_len, dtype=torch.bool).triu(1), float("-inf"))
    self_out = torch.einsum("mhqk,mkhd->mqhd", scores.softmax(-1), sv).reshape(rows, q_len, -1)
    x = x + self_out @ attn.wo.weight.T
    return x + block.feed_forward(block.ffn_norm(x))


def test_lazy_block_equals_explicit_reference(models):
    model = models["lazy_decoder"]
    cfg = model.config
    block = model.layers["0"]
    assert block.cross_attention.wk is None and block.cross_attention.wv is None  # no K/V projections
    assert not [n for n, _ in model.layers.named_parameters() if ".wk" in n and "cross" in n]
    torch.manual_seed(3)
    rows, ctx_rows, q_len, n_ctx = 5, 3, 3, 7
    x = torch.randn(rows, q_len, cfg.dim)
    k, v = torch.randn(2, ctx_rows, cfg.g_kv, n_ctx, cfg.head_dim).unbind(0)
    owner = torch.tensor([0, 2, 1, 2, 0])
    ctx_valid = torch.rand(ctx_rows, n_ctx) > 0.3
    ctx_valid[:, 0] = True  # the user-profile token is always there
    cos, sin = model.rope(torch.arange(q_len).expand(rows, q_len))
    from_block = block(x, cos, sin, AttentionMask(causal=True), k, v, owner, ctx_valid)
    torch.testing.assert_close(from_block, reference_lazy_block(block, x, k, v, owner, ctx_valid, cfg))


@pytest.mark.parametrize("s_kv,l_kv,g_kv", [(1, 1, 4), (2, 3, 2), (1, 2, 1)])
def test_kv_sets_shapes_and_norms(s_kv, l_kv, g_kv):
    cfg = tiny_config(s_kv=s_kv, l_kv=l_kv, g_kv=g_kv)
    model = build(cfg)
    assert cfg.d_context == s_kv * l_kv * g_kv * cfg.head_dim
    tokens = torch.randn(2, 5, cfg.d_context)
    sets = model.kv_sets(tokens)
    assert len(sets) == l_kv and len(model.kv_norms) == l_kv * s_kv
    chunk = g_kv * cfg.head_dim
    for layer, (k, v) in enumerate(sets):
        assert k.shape == v.shape == (2, g_kv, 5, cfg.head_dim)
        start = layer * s_kv * chunk
        want_k = F.rms_norm(tokens[..., start:start + chunk], (chunk,), eps=cfg.norm_eps)
        torch.testing.assert_close(k.transpose(1, 2).flatten(2), want_k)
        if s_kv == 1:
            assert v is k  # v_l = k_l
        else:
            want_v = F.rms_norm(tokens[..., start + chunk:start + 2 * chunk], (chunk,), eps=cfg.norm_eps)
            torch.testing.assert_close(v.transpose(1, 2).flatten(2), want_v)


def test_kv_set_sharing_across_blocks(batch):
    cfg = tiny_config(n_layers=6, l_kv=3, s_kv=1)
    assert [cfg.kv_set(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [tiny_config(n_layers=6, l_kv=1).kv_set(i) for i in range(6)] == [0] * 6
    assert [tiny_config(n_layers=6, l_kv=6).kv_set(i) for i in range(6)] == list(range(6))
    model = build(cfg)
    seen = {}
    for name, block in model.layers.items():
        block.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[4]))
    with torch.no_grad():
        model(batch)
        sets = model.kv_sets(model.context(batch)[0])
    for i in range(6):
        torch.testing.assert_close(seen[str(i)], sets[i // 2][0])


# ------------------------------------------------------------------ entry points
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_logprobs_equal_teacher_forcing(arch, models, batch):
    model = models[arch]
    with torch.no_grad():
        loss = model(batch)
        rows, k = batch["targets"].shape
        codes = batch["target_sids"].flatten(0, 1)
        owner = torch.arange(rows).repeat_interleave(k)
        per_level = []
        for t in range(len(LEVELS)):
            logp = model(batch, owner=owner, prefix=codes[:, :t])
            assert logp.shape == (rows * k, LEVELS[t])
            per_level.append(logp.gather(1, codes[:, t:t + 1])[:, 0])
    valid = batch["targets"].flatten() != 0
    want = -(torch.stack(per_level, 1).mean(1) * valid).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["lazy_decoder", "encoder_decoder"])
def test_grouped_rows_equal_gathered_rows(arch, models, batch):
    """Rows grouped by owner attend to their context in place; any other order gathers K/V per row.
    Both give the same log-probs (the grouped path is what training and ranking use)."""
    model = models[arch]
    rows, k = batch["targets"].shape
    codes = batch["target_sids"].flatten(0, 1)[:, :2]
    owner = torch.arange(rows).repeat_interleave(k)
    order = torch.randperm(rows * k, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = model(batch, owner=owner, prefix=codes)
        shuffled = model(batch, owner=owner[order], prefix=codes[order])
    torch.testing.assert_close(shuffled, grouped[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_changes_nothing(arch, models, batch):
    model = models[arch]
    owner, prefix = torch.tensor([0, 1, 2, 0]), torch.tensor([[1, 2], [0, 0], [3, 4], [2, 1]])
    padded = left_pad(batch, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(batch))
        torch.testing.assert_close(model(padded, owner=owner, prefix=prefix), model(batch, owner=owner, prefix=prefix))
        other = dict(batch, target_sids=batch["target_sids"].clone())
        other["target_sids"][1, 1] = torch.tensor([3, 4, 5])  # the padding target's codes are ignored
        torch.testing.assert_close(model(other), model(batch))


def test_lazy_loss_falls_when_fitting_a_batch(batch):
    model = build(tiny_config())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_moe_variant_from_block_two_trains(batch):
    moe = MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, first_dense_layers=2, bias_update_rate=1e-3)
    cfg = tiny_config(n_layers=4, moe=moe)
    model = build(cfg)
    assert sorted(model.moe_layers()) == ["2", "3"]
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert cfg.num_params(active=True) < cfg.num_params()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(batch)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.2.feed_forward.router" in n)
    opt.step()
    model.update_moe_balance()
    assert "moe_load_max_mean/2" in model.moe_metrics() and torch.isfinite(loss)
    assert model.layers["2"].feed_forward.expert_bias.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_meta_build_initialises_everything(arch, models):
    model = models[arch]
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else -1)
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(b).all() if b.is_floating_point() else (b >= 0).all() for b in model.buffers())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(model.state_dict(), build(model.config).state_dict())


def test_config_errors_name_the_key():
    cases = [(dict(s_kv=3), "model.s_kv"), (dict(g_kv=3), "model.g_kv"), (dict(l_kv=9), "model.l_kv"),
             (dict(context_features=["item", "colour"]), "model.context_features"),
             (dict(architecture="rnn"), "model.architecture")]
    for fields, key in cases:
        with pytest.raises(ConfigError, match=key):
            tiny_config(**fields).validate()
    with pytest.raises(ConfigError, match="model.n_items"):
        OneRec(tiny_config(n_items=0))


# ------------------------------------------------------------------ FLOPs (§3.3 Table 2)
def test_flops_ordering_at_1b_context_512():
    flops = compare_architectures("1B", context_len=512)  # meta device: counted, never computed
    lazy, encdec, naive = (flops[a]["train"] for a in ("lazy_decoder", "encoder_decoder", "naive_decoder"))
    print(f"\n1B, context 512, training GFLOPs/sample: lazy {lazy / 1e9:.1f}, enc-dec 1:1 {encdec / 1e9:.1f}, "
          f"naive {naive / 1e9:.1f}; naive/lazy {naive / lazy:.1f}x (paper: 635/18.9 = 33.6x)")
    assert naive > encdec > lazy and naive / lazy > 10
    for arch, row in flops.items():
        assert abs(row["train"] - row["formula_train"]) <= 0.02 * row["train"], arch


def test_measured_flops_match_formula_on_a_real_batch(models, batch):
    model = models["lazy_decoder"]
    full = {k: v for k, v in batch.items()}
    full["ctx_items"] = full["ctx_items"].clamp(min=1)  # a full context, as the formula assumes
    full["targets"] = full["targets"][:, :1]
    full["target_sids"] = full["target_sids"][:, :1]
    measured = training_flops_per_sample(model, full)
    assert measured == pytest.approx(formula_flops_per_sample(model.config, full["ctx_items"].shape[1]), rel=0.02)


# ------------------------------------------------------------------ SASRec
def test_sasrec_scores_match_loss_and_padding(batch):
    cfg = SASRecConfig(n_items=N_ITEMS, dim=16, n_heads=2, n_layers=2, context_len=12)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SASRec(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loss = model(batch)
    logits = model(batch, score_items=True)
    assert logits.shape == (3, N_ITEMS + 1) and torch.isinf(logits[:, 0]).all()
    targets = batch["targets"]
    want = sum(-logits[r].log_softmax(-1)[targets[r, j]] for r in range(3) for j in range(2) if targets[r, j])
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(model.tok_embeddings.weight.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(model(left_pad(batch, 3), score_items=True), logits.detach())
