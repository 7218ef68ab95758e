"""S²GR on random inputs: the thinking chain against written-out references, beam search that thinks
without expanding the beam, the auxiliary losses against hand computations, TIGER = OneRec's
encoder-decoder when thinking is off."""
import pytest
import torch
import torch.nn.functional as F

from keel.config import build_dataclass
from keel.errors import ConfigError
from keel.model.onerec import OneRec
from keel.model.s2gr import S2GR, S2GRConfig, ThinkingConfig
from keel.model.sid_beam import SidTrie, beam_search
from test_onerec_model import build as build_model

LEVELS = [3, 3, 2]  # 18 valid paths; the table below uses 12 of them
N_ITEMS = 12
CODE_DIM, K_C = 6, 2


def tiny_config(thinking=True, **overrides) -> S2GRConfig:
    fields = dict(dim=32, n_layers=2, n_heads=4, d_feature=8, g_kv=2, context_len=8, n_items=N_ITEMS,
                  n_users=5, sid_levels=list(LEVELS), user_features=["age"], user_feature_sizes=[4], n_gaps=8,
                  code_dim=CODE_DIM, code_levels=2, s2gr=ThinkingConfig(thinking=thinking, align_clusters=K_C))
    fields.update(overrides)
    return S2GRConfig(**fields)


def build(cfg, cls=S2GR, seed=0):
    return build_model(cfg, seed=seed, cls=cls)


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(3)
    paths = torch.cartesian_prod(*[torch.arange(v) for v in LEVELS])
    sids = torch.cat([torch.zeros(1, len(LEVELS), dtype=torch.long),
                      paths[torch.randperm(len(paths), generator=g)[:N_ITEMS]]])
    return sids


@pytest.fixture(scope="module")
def batch(table):
    g = torch.Generator().manual_seed(1)
    rows, ctx, k = 3, 5, 2
    items = torch.randint(1, N_ITEMS + 1, (rows, ctx), generator=g)
    items[0, :2] = 0
    targets = torch.randint(1, N_ITEMS + 1, (rows, k), generator=g)
    targets[2, 0] = targets[0, 1]  # the same item twice in one batch: not a negative of itself
    targets[1, 1] = 0  # a padding target
    vectors = torch.randn(N_ITEMS + 1, CODE_DIM, generator=g)
    return {"user": torch.arange(1, rows + 1), "user_feats": torch.randint(0, 4, (rows, 1), generator=g),
            "ctx_items": items, "ctx_ratings": torch.randint(1, 6, (rows, ctx), generator=g) * (items != 0),
            "ctx_gaps": torch.randint(1, 8, (rows, ctx), generator=g) * (items != 0),
            "targets": targets, "ctx_sids": table[items], "target_sids": table[targets],
            "align_centres": torch.randn(2, K_C, CODE_DIM, generator=g),
            "target_clusters": torch.randint(0, K_C, (rows, k, 2), generator=g),
            "target_code_vectors": vectors[targets]}


@pytest.fixture(scope="module")
def model():
    return build(tiny_config())


def filler_logprobs(model, batch, owner, prefix):
    """The model with zeroed thoughts written as a plain AR model: one pass over
    [BOS, p_1, s_1, ..., s_t, p_{t+1}] with fixed level embeddings in the thought slots."""
    memory, ctx_valid = model.context_memory(batch)
    parts = [model.tok_embeddings(prefix.new_zeros(len(prefix), 1))]
    for level in range(prefix.shape[1] + 1):
        parts.append(model.level_embeddings.weight[level].expand(len(prefix), 1, -1))
        if level < prefix.shape[1]:
            parts.append(model.tok_embeddings(prefix[:, level:level + 1] + model.token_offsets[level]))
    h = model.run_decoder(torch.cat(parts, 1), memory, ctx_valid, owner)
    return model.level_logprobs(h[:, -1], prefix.shape[1])


@torch.no_grad()
def test_zeroed_thoughts_equal_a_plain_model_and_its_beam_search(batch, table):
    zeroed = build(tiny_config(), seed=1)
    zeroed.thought_norm.weight.zero_()  # every thought becomes 0: only p_l is fed back
    trie = SidTrie.from_table(table, LEVELS)
    owner = torch.tensor([0, 1, 2, 2])
    prefix = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    torch.testing.assert_close(zeroed(batch, owner=owner, prefix=prefix), filler_logprobs(zeroed, batch, owner, prefix))
    thinking = beam_search(lambda o, p: zeroed(batch, owner=o, prefix=p), trie, 3, beam=4, topk=4)
    plain = beam_search(lambda o, p: filler_logprobs(zeroed, batch, o, p), trie, 3, beam=4, topk=4)
    assert torch.equal(thinking[0], plain[0])
    torch.testing.assert_close(thinking[1], plain[1])


@torch.no_grad()
def test_stepwise_logprobs_equal_teacher_forcing(model, batch):
    codes = batch["target_sids"]
    forced = model.code_logprobs(batch, codes)  # [B, K, L], one chain per path
    flat = codes.flatten(0, 1)
    owner = torch.arange(3).repeat_interleave(2)
    for t in range(len(LEVELS)):
        step = model(batch, owner=owner, prefix=flat[:, :t]).gather(1, flat[:, t:t + 1])[:, 0]
        torch.testing.assert_close(step.view(3, 2), forced[..., t])


@torch.no_grad()
def test_thinking_beam_search_keeps_the_beam_and_is_exact_when_wide(model, batch, table):
    """Beam width = catalogue: the result is every item, in the order of exact teacher-forced scores.
    A thought that expanded the beam (or scored) would change the count or the scores."""
    trie = SidTrie.from_table(table, LEVELS)
    items, logp = beam_search(lambda o, p: model(batch, owner=o, prefix=p), trie, 3, beam=N_ITEMS, topk=N_ITEMS)
    every = table[1:].expand(3, -1, -1)
    exact = model.code_logprobs(batch, every).sum(-1)  # [B, n_items]
    for row in range(3):
        assert sorted(items[row].tolist()) == list(range(1, N_ITEMS + 1))
        torch.testing.assert_close(logp[row], exact[row, items[row] - 1])
        assert torch.all(logp[row, :-1] >= logp[row, 1:])


@torch.no_grad()
def test_thinking_off_is_the_encoder_decoder(batch):
    tiger = build(tiny_config(thinking=False), seed=2)
    reference = build(tiny_config(thinking=False), cls=OneRec, seed=3)
    reference.load_state_dict(tiger.state_dict())
    assert not hasattr(tiger, "level_embeddings")
    torch.testing.assert_close(tiger(batch), reference(batch))


def test_auxiliary_losses_against_hand_computation(model, batch):
    torch.manual_seed(0)
    m, levels, d = 6, 2, 32
    thoughts = torch.randn(m, 3, d)
    clusters = torch.randint(0, K_C, (m, levels))
    centres = torch.randn(levels, K_C, CODE_DIM)
    tau = model.config.s2gr.align_tau
    got = model.align_loss(thoughts, clusters, centres)
    for row in range(m):
        want = 0.0
        for level in range(levels):
            z = model.align_proj(thoughts[row, level])
            cos = torch.stack([F.cosine_similarity(z, c, dim=0) for c in centres[level]])
            want = want - torch.log_softmax(cos / tau, 0)[clusters[row, level]]
        torch.testing.assert_close(got[row], want)

    guess, vectors = torch.randn(m, d), torch.randn(m, CODE_DIM)
    items = torch.tensor([4, 7, 4, 0, 9, 7])
    got = model.infonce_loss(guess, vectors, items)
    tau = model.config.s2gr.infonce_tau
    for row in range(m):
        q = model.aux_proj(guess[row])
        negatives = [j for j in range(m) if j != row and items[j] != 0 and items[j] != items[row]]
        sims = torch.stack([F.cosine_similarity(q, vectors[j], dim=0) for j in [row] + negatives]) / tau
        torch.testing.assert_close(got[row], -torch.log_softmax(sims, 0)[0])


def test_every_parameter_learns_and_the_loss_falls(batch):
    model = build(tiny_config(), seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(batch)
    first.backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert frozen == [], frozen
    losses = [first.item()]
    for _ in range(40):
        opt.step()
        opt.zero_grad()
        loss = model(batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.architecture"):
        build_dataclass(S2GRConfig, {"architecture": "lazy_decoder"}, "model")
    with pytest.raises(ConfigError, match="model.s2gr.align_tau"):
        tiny_config(s2gr=ThinkingConfig(align_tau=0.0)).validate()
    with pytest.raises(ConfigError, match="model.code_dim"):
        tiny_config(code_dim=0).check_data_sizes()
    cfg = tiny_config()
    assert cfg.s2gr.aux_layers == 1  # half the decoder's depth
    assert cfg.num_params() == sum(p.numel() for p in build(cfg).parameters())
