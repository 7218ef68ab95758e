"""Constrained beam search and exact scoring over the valid semantic IDs of a catalogue.

`SidTrie` compiles the table into per-level CSR transitions: the valid prefixes of length t get
ids 0..n_prefix_t-1 (level 0 has the one empty prefix), and each edge (parent prefix, code) leads
to a prefix of length t+1 or, at the last level, to the item index itself. A beam is then just
(prefix id, codes, score): per level, the beams' children are scattered into a [M, V_t] table
(-1 = invalid, whose candidates get -inf), so batch x beam is one tensor op and the only Python
loop is over the L levels. Invalid paths can never be emitted: an output item is always the leaf
of a trie edge, and a candidate whose score is not finite is never emitted (item 0).

Determinism: candidates are ranked by score, ties broken by the smallest item index below the
candidate (the item itself at the last level), so results do not depend on torch.topk's order.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from keel.errors import ConfigError, DataError

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (owner [M], prefix [M, t]) -> logp [M, V_t]
MAX_BEAM = 512


class SidTrie:
    def __init__(self, levels, indptr, edge_code, edge_child, edge_key, child_min_item, prefix_codes, n_items):
        self.sid_levels = list(levels)   # V_t per level
        self.indptr = indptr             # [t] int64 [n_prefix_t + 1]: edges of prefix p are indptr[p]:indptr[p+1]
        self.edge_code = edge_code       # [t] int64 [n_edges_t], sorted by (parent, code)
        self.edge_child = edge_child     # [t] int64 [n_edges_t]: prefix id at t+1 (item index at the last level)
        self.edge_key = edge_key         # [t] int64 [n_edges_t]: parent * V_t + code, sorted (for lookups)
        self.child_min_item = child_min_item  # [t] int64 [n_prefix_{t+1}]: smallest item below (tie-break)
        self.prefix_codes = prefix_codes  # [t] int64 [n_prefix_t, t]
        self.n_items = n_items

    @property
    def depth(self) -> int:
        return len(self.sid_levels)

    def n_prefixes(self, t: int) -> int:
        return self.indptr[t].numel() - 1

    @classmethod
    def from_table(cls, sids, sid_levels) -> "SidTrie":
        """sids int64 [n_items + 1, L] (row 0 = padding, skipped); every row must be unique."""
        s = np.asarray(sids.cpu() if isinstance(sids, torch.Tensor) else sids, dtype=np.int64)[1:]
        n, depth = s.shape
        if depth != len(sid_levels) or (n and ((s < 0).any() or (s >= np.asarray(sid_levels)).any())):
            raise DataError(f"SID table: codes {s.shape} do not fit sid_levels {list(sid_levels)}")
        if np.unique(s, axis=0).shape[0] != n:
            raise DataError("SID table: two items share a full SID path; rebuild it with de-duplication on")
        pid = np.zeros(n, dtype=np.int64)
        indptr, codes_l, child_l, key_l, minit_l, prefix_codes = [], [], [], [], [], [np.zeros((1, 0), np.int64)]
        items = np.arange(1, n + 1, dtype=np.int64)
        n_parent = 1
        for t, v in enumerate(sid_levels):
            key = pid * v + s[:, t]
            uniq, child = np.unique(key, return_inverse=True)
            child = child.reshape(-1)
            parent, code = uniq // v, uniq % v
            indptr.append(np.searchsorted(parent, np.arange(n_parent + 1)))
            codes_l.append(code)
            key_l.append(uniq)
            minit = np.full(uniq.size, np.iinfo(np.int64).max)
            np.minimum.at(minit, child, items)
            minit_l.append(minit)
            if t == depth - 1:
                leaf = np.zeros(uniq.size, dtype=np.int64)
                leaf[child] = items  # rows are unique, so each last-level edge is one item
                child_l.append(leaf)
            else:
                child_l.append(np.arange(uniq.size, dtype=np.int64))
                pc = np.zeros((uniq.size, t + 1), dtype=np.int64)
                pc[child] = s[:, :t + 1]
                prefix_codes.append(pc)
            pid, n_parent = child, uniq.size
        T = lambda xs: [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]  # noqa: E731
        return cls(sid_levels, T(indptr), T(codes_l), T(child_l), T(key_l), T(minit_l), T(prefix_codes), n)

    def to(self, device) -> "SidTrie":
        mv = lambda xs: [x.to(device) for x in xs]  # noqa: E731
        return SidTrie(self.sid_levels, mv(self.indptr), mv(self.edge_code), mv(self.edge_child), mv(self.edge_key),
                       mv(self.child_min_item), mv(self.prefix_codes), self.n_items)

    def children(self, t: int, parent: torch.Tensor) -> torch.Tensor:
        """[M, V_t] next prefix id (item index at the last level) of each parent prefix, -1 where
        the code is invalid; parent -1 (a dead beam) has no children."""
        alive = parent >= 0
        p = parent.clamp(min=0)
        start = self.indptr[t][p]
        deg = torch.where(alive, self.indptr[t][p + 1] - start, 0)
        rows = torch.repeat_interleave(torch.arange(parent.numel(), device=parent.device), deg)
        offset = torch.arange(rows.numel(), device=parent.device) - torch.repeat_interleave(deg.cumsum(0) - deg, deg)
        edge = start[rows] + offset
        out = torch.full((parent.numel(), self.sid_levels[t]), -1, dtype=torch.int64, device=parent.device)
        out[rows, self.edge_code[t][edge]] = self.edge_child[t][edge]
        return out

    def item_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Item index of each full code path [M, L]; 0 where the path is not in the catalogue."""
        pid = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
        for t, v in enumerate(self.sid_levels):
            key = pid * v + codes[:, t]
            keys = self.edge_key[t]
            pos = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
            found = (keys[pos] == key) & (pid >= 0) & (codes[:, t] >= 0) & (codes[:, t] < v)
            pid = torch.where(found, self.edge_child[t][pos], -1)
        return pid.clamp(min=0)


def _rank(scores: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k best finite scores per row, ties broken by smaller `ties`; exact
    whatever order torch.topk returns equal values in (every tied candidate is pulled in first)."""
    k = min(k, scores.shape[1])
    kth = scores.topk(k, dim=1).values[:, -1:]
    n_tied = ((scores >= kth) & torch.isfinite(scores)).sum(1).max().item()
    wide = scores.topk(max(k, n_tied), dim=1).indices
    sc, tk = scores.gather(1, wide), ties.gather(1, wide)
    by_tie = tk.argsort(dim=1, stable=True)
    sc, wide = sc.gather(1, by_tie), wide.gather(1, by_tie)
    by_score = sc.argsort(dim=1, descending=True, stable=True)
    return wide.gather(1, by_score)[:, :k]


def _check(trie: SidTrie, logp: torch.Tensor, m: int, t: int) -> None:
    if tuple(logp.shape) != (m, trie.sid_levels[t]):
        raise ConfigError(f"beam search: step_fn returned {tuple(logp.shape)} at level {t}, "
                          f"expected [{m}, {trie.sid_levels[t]}] (sid_levels {trie.sid_levels})")


@torch.no_grad()
def beam_search(step_fn: StepFn, trie: SidTrie, batch_size: int, beam: int, topk: int, code_logp: bool = False):
    """(items int64 [B, topk], logp float [B, topk]) best first over valid SIDs only; items 0 and
    logp -inf where fewer than topk valid items have a finite score. With code_logp, also the
    log-prob step_fn gave each of the item's codes [B, topk, L] (their sum is logp): the rollout
    policy's own probabilities, which recommender RL keeps as pi_old."""
    if not 1 <= beam <= MAX_BEAM or topk < 1:
        raise ConfigError(f"beam search: beam {beam} and topk {topk}; expected 1 <= beam <= {MAX_BEAM}, topk >= 1")
    dev = None
    b = batch_size
    pid = torch.zeros(b, 1, dtype=torch.int64)
    codes = torch.zeros(b, 1, 0, dtype=torch.int64)
    score = torch.zeros(b, 1)
    code_scores = torch.zeros(b, 1, 0)  # [b, w, t]: each beam's per-code log-probs so far
    for t, v in enumerate(trie.sid_levels):
        w = pid.shape[1]
        owner = torch.arange(b).repeat_interleave(w)
        if dev is None:
            logp = step_fn(owner, codes.reshape(b * w, t))
            dev = logp.device
            trie, pid, codes, score, owner = trie.to(dev), pid.to(dev), codes.to(dev), score.to(dev), owner.to(dev)
            code_scores = code_scores.to(dev)
        else:
            logp = step_fn(owner, codes.reshape(b * w, t))
        _check(trie, logp, b * w, t)
        child = trie.children(t, pid.reshape(-1)).view(b, w * v)
        cand = (score.unsqueeze(-1) + logp.view(b, w, v).float()).reshape(b, w * v)
        cand = cand.masked_fill(child < 0, float("-inf"))
        last = t == trie.depth - 1
        ties = child if last else trie.child_min_item[t][child.clamp(min=0)]
        ties = torch.where(child < 0, torch.iinfo(torch.int64).max, ties)
        n_valid = torch.isfinite(cand).sum(1).max().item()
        keep = topk if last else max(1, min(beam, n_valid))
        pick = _rank(cand, ties, keep)
        score = cand.gather(1, pick)
        dead = ~torch.isfinite(score)
        nxt = child.gather(1, pick).masked_fill(dead, -1)
        parent_beam = pick // v
        if code_logp:
            code_scores = torch.cat([code_scores.gather(1, parent_beam.unsqueeze(-1).expand(-1, -1, t)),
                                     logp.view(b, w * v).float().gather(1, pick).unsqueeze(-1)], 2)
        if last:
            items = nxt.clamp(min=0)
            if items.shape[1] < topk:  # fewer candidates than topk
                pad = topk - items.shape[1]
                items = torch.cat([items, items.new_zeros(b, pad)], 1)
                score = torch.cat([score, score.new_full((b, pad), float("-inf"))], 1)
                code_scores = torch.cat([code_scores, code_scores.new_full((b, pad, t + 1), float("-inf"))], 1)
            return (items, score, code_scores) if code_logp else (items, score)
        codes = torch.cat([codes.gather(1, parent_beam.unsqueeze(-1).expand(-1, -1, t)),
                           (pick % v).unsqueeze(-1)], 2).masked_fill(dead.unsqueeze(-1), 0)
        pid = nxt
    raise AssertionError("unreachable: the trie has at least one level")


@torch.no_grad()
def score_all_items(step_fn: StepFn, trie: SidTrie, batch_size: int, max_rows: int = 1 << 16) -> torch.Tensor:
    """Exact sequence log-probs [B, n_items + 1] of every item (column 0 = -inf): every valid prefix
    is expanded level by level, step_fn called on at most `max_rows` rows at a time."""
    b = batch_size
    score = None  # [B, n_prefix_t]
    for t, v in enumerate(trie.sid_levels):
        n_p = trie.n_prefixes(t)
        per = max(1, max_rows // b)
        parts = []
        for lo in range(0, n_p, per):  # chunks of prefixes, each for the whole batch at once
            hi = min(n_p, lo + per)
            owner = torch.arange(b).repeat_interleave(hi - lo)
            pref = trie.prefix_codes[t][lo:hi]
            if score is not None:
                owner, pref = owner.to(score.device), pref.to(score.device)
            logp = step_fn(owner, pref.repeat(b, 1))
            _check(trie, logp, b * (hi - lo), t)
            parts.append(logp.float().view(b, hi - lo, v))
        logp = torch.cat(parts, 1)
        if score is None:
            trie = trie.to(logp.device)
            score = torch.zeros(b, 1, device=logp.device)
        parent = torch.repeat_interleave(torch.arange(n_p, device=logp.device),
                                         trie.indptr[t][1:] - trie.indptr[t][:-1])
        edge_score = score[:, parent] + logp[:, parent, trie.edge_code[t]]
        if t == trie.depth - 1:
            out = torch.full((b, trie.n_items + 1), float("-inf"), device=logp.device)
            out[:, trie.edge_child[t]] = edge_score
            return out
        score = edge_score  # edges of level t are exactly the prefixes of level t+1, in id order
    raise AssertionError("unreachable: the trie has at least one level")
