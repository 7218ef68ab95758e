"""Constrained beam search over semantic IDs: only valid items, deterministic, and equal to
exhaustive scoring when the beam holds every valid prefix."""
import numpy as np
import pytest
import torch

from keel.errors import ConfigError, DataError
from keel.model.sid_beam import SidTrie, beam_search, score_all_items


def random_table(rng, n_items, levels):
    """A random catalogue: n_items distinct code paths over codebooks `levels`."""
    space = int(np.prod(levels))
    flat = rng.choice(space, size=n_items, replace=False)
    sids = np.zeros((n_items + 1, len(levels)), dtype=np.int64)
    sids[1:] = np.stack(np.unravel_index(flat, levels), 1)
    return sids


def make_step(levels, batch, seed, quantise=False):
    """A deterministic fake model: log-probs are a fixed function of (owner, prefix). With
    `quantise`, scores take few distinct values so ties are common."""
    def step(owner, prefix):
        t = prefix.shape[1]
        w = torch.tensor([7919, 104729, 1299709, 15485863][:t] or [0], dtype=torch.int64)
        h = owner * 31 + seed * 1009 + (prefix * w[:t]).sum(1) if t else owner * 31 + seed * 1009
        g = torch.Generator().manual_seed(0)
        base = torch.randn(batch * 4096 + 7, levels[t], generator=g)
        logits = base[(h % base.shape[0]).long()]
        if quantise:
            logits = logits.round()
        return torch.log_softmax(logits, -1)
    return step


def brute_force(step, sids, levels, batch):
    """Sum of per-level log-probs of every item, one prefix at a time (no trie)."""
    sids_t = torch.from_numpy(sids)
    n = sids.shape[0] - 1
    out = torch.full((batch, n + 1), float("-inf"))
    for u in range(batch):
        for i in range(1, n + 1):
            total = 0.0
            for t in range(len(levels)):
                total += step(torch.tensor([u]), sids_t[i:i + 1, :t])[0, sids_t[i, t]].item()
            out[u, i] = total
    return out


def brute_topk(scores, k):
    rows = []
    for r in scores.tolist():
        order = sorted(range(1, len(r)), key=lambda i: (-r[i], i))[:k]
        rows.append(order)
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(6))
def test_beam_emits_only_valid_items_and_is_deterministic(seed):
    rng = np.random.default_rng(seed)
    levels = [int(rng.integers(2, 6)) for _ in range(int(rng.integers(1, 4)))]
    n = int(rng.integers(1, min(40, int(np.prod(levels))) + 1))
    sids = random_table(rng, n, levels)
    trie = SidTrie.from_table(sids, levels)
    batch = 3
    step = make_step(levels, batch, seed, quantise=seed % 2 == 1)
    beam, topk = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    items, logp = beam_search(step, trie, batch, beam, topk)
    assert items.shape == (batch, topk) and logp.shape == (batch, topk)
    for row, lp in zip(items.tolist(), logp.tolist()):
        real = [i for i in row if i != 0]
        assert all(1 <= i <= n for i in real) and len(set(real)) == len(real)
        assert row[:len(real)] == real  # padding only at the end
        assert len(real) == min(topk, n) or beam < n
        assert all(a >= b for a, b in zip(lp, lp[1:]))
    again = beam_search(step, trie, batch, beam, topk)
    assert torch.equal(items, again[0]) and torch.equal(logp, again[1])
    # every emitted item's logp is its true sequence log-prob
    exact = score_all_items(step, trie, batch)
    got = exact.gather(1, items)
    assert torch.allclose(got[items > 0], logp[items > 0], atol=1e-5)
    # the per-code log-probs kept for RL's pi_old: each is step_fn's at the item's own prefix
    again_items, again_logp, per_code = beam_search(step, trie, batch, beam, topk, code_logp=True)
    assert torch.equal(again_items, items) and torch.equal(again_logp, logp)
    for u, row in enumerate(items.tolist()):
        for k, item in enumerate(row):
            if item == 0:
                continue
            path = torch.from_numpy(sids[item])
            recount = [step(torch.tensor([u]), path[None, :t])[0, path[t]] for t in range(len(levels))]
            assert torch.allclose(per_code[u, k], torch.stack(recount).float(), atol=1e-6)
    assert torch.equal(trie.item_of(torch.from_numpy(sids[1:])), torch.arange(1, n + 1))


@pytest.mark.parametrize("quantise", [False, True])
def test_full_beam_equals_exhaustive_scoring(quantise):
    rng = np.random.default_rng(1)
    levels = [3, 4, 2]
    sids = random_table(rng, 17, levels)
    trie = SidTrie.from_table(sids, levels)
    batch = 4
    step = make_step(levels, batch, 5, quantise=quantise)
    truth = brute_force(step, sids, levels, batch)
    exact = score_all_items(step, trie, batch)
    assert torch.allclose(exact, truth, atol=1e-5)
    assert torch.isinf(exact[:, 0]).all()
    width = max(trie.n_prefixes(t) for t in range(3))  # holds every valid prefix
    items, logp = beam_search(step, trie, batch, width, 17)
    assert torch.equal(items, brute_topk(truth, 17))  # order and ties (by item index) as brute force
    assert torch.allclose(logp, truth.gather(1, items), atol=1e-5)
    items5, _ = beam_search(step, trie, batch, width, 5)
    assert torch.equal(items5, items[:, :5])


def test_bad_inputs():
    levels = [2, 2]
    sids = np.array([[0, 0], [0, 1], [0, 1]])
    with pytest.raises(DataError, match="share a full SID path"):
        SidTrie.from_table(sids, levels)
    trie = SidTrie.from_table(np.array([[0, 0], [0, 1], [1, 0]]), levels)
    with pytest.raises(ConfigError, match="beam"):
        beam_search(make_step(levels, 1, 0), trie, 1, 513, 3)
    with pytest.raises(ConfigError, match="expected"):
        beam_search(lambda o, p: torch.zeros(o.numel(), 5), trie, 1, 4, 3)
    assert trie.item_of(torch.tensor([[1, 1], [1, 0], [0, 1]])).tolist() == [0, 2, 1]
