"""The floors every recommender is compared with: popularity and first-order Markov scorers.

Both are fitted on the TRAIN interactions of a LeaveOneOutSplit only (validation and test items are
never counted, not even when scoring test) and score a batch of keel/data/recsys samples as a
[B, n_items + 1] matrix (column 0, padding, is -inf), ready for keel.model.rec_eval.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from keel.data.recsys import LeaveOneOutSplit


def _train_sequences(split: LeaveOneOutSplit) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr by user, items) of every user's train items in chronological order."""
    return split.history("valid")


class PopularityScorer:
    """Score = how often the item occurs among the train interactions (the same for every user)."""

    def __init__(self, train_items: np.ndarray, n_items: int):
        counts = np.bincount(train_items, minlength=n_items + 1).astype(np.float64)
        counts[0] = -math.inf
        self.item_scores = torch.from_numpy(counts)
        self.n_items = n_items

    @classmethod
    def from_split(cls, split: LeaveOneOutSplit) -> "PopularityScorer":
        return cls(_train_sequences(split)[1], split.log.n_items)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.item_scores.expand(len(batch["user"]), -1).clone()


class MarkovScorer:
    """Score of item j after last context item i = how often j directly followed i in a user's train
    sequence; items never seen after i (and rows with no context) fall back to popularity, scaled
    below 1 so that any observed transition outranks every unobserved one."""

    def __init__(self, indptr: np.ndarray, items: np.ndarray, n_items: int):
        n = n_items + 1
        follows = np.ones(len(items), dtype=bool)
        follows[indptr[:-1][indptr[:-1] < len(items)]] = False  # a user's first item follows nothing
        nxt = np.nonzero(follows)[0]
        keys, counts = np.unique(items[nxt - 1] * n + items[nxt], return_counts=True)
        self.row_ptr = np.searchsorted(keys // n, np.arange(n + 1)).astype(np.int64)  # CSR by last item
        self.cols, self.counts = keys % n, counts.astype(np.float64)
        popularity = np.bincount(items, minlength=n).astype(np.float64)
        backoff = popularity / (popularity.max() + 1.0)
        backoff[0] = -math.inf
        self.backoff = torch.from_numpy(backoff)
        self.n_items = n_items

    @classmethod
    def from_split(cls, split: LeaveOneOutSplit) -> "MarkovScorer":
        indptr, items = _train_sequences(split)
        return cls(indptr, items, split.log.n_items)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        last = batch["ctx_items"][:, -1].cpu().numpy()  # left-padded: the newest context item is last
        scores = self.backoff.expand(len(last), -1).clone()
        starts, lengths = self.row_ptr[last], self.row_ptr[last + 1] - self.row_ptr[last]
        rows = np.repeat(np.arange(len(last)), lengths)
        before = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        at = np.repeat(starts - before, lengths) + np.arange(len(rows))
        scores[torch.from_numpy(rows), torch.from_numpy(self.cols[at])] += torch.from_numpy(self.counts[at])
        return scores
