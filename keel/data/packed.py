"""Pretraining samples: documents packed end to end and cut into fixed-length windows.

The documents of a megatron-core indexed dataset (PREFIX.bin/.idx, each document ending in EOS)
form one token stream; sample i is the window stream[i*L : i*L + L + 1], so consecutive samples
share one token and no token is wasted except the final partial window. Each sample also carries
per-token `positions` (offset inside its document) and `doc_ids`, so attention can be restricted
to the current document and RoPE restarts where a document starts; with document_mask=False
(data.document_mask) a sample is one whole row instead: positions 0..L-1 and doc_ids all 0.

Only the slices a sample needs are read, through the memory-mapped .bin: corpora of any size work.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from keel.errors import DataError

# How many tokens at each end of a user-supplied .bin are checked against the vocabulary.
_VOCAB_CHECK_TOKENS = 1 << 20


def megatron_data_module(name: str):
    """A module of megatron.core.datasets (`indexed_dataset`, `helpers_cpp`), imported without
    running megatron/core/__init__.py.

    That __init__ imports megatron-core's whole model stack, whose fused kernels are decorated with
    torch.compile at import time, which loads TorchInductor: ~4 s of a ~6 s import, paid by every
    process and rank that only reads tokens. keel uses nothing of megatron-core but its data
    modules, so when megatron.core is not imported yet it is registered as a bare package (its
    submodules import normally) and parallel_state goes first, as the full __init__ would have it
    (megatron.core.utils and parallel_state import each other)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "megatron.core" not in sys.modules:
            spec = importlib.util.find_spec("megatron.core")
            if spec is None:
                raise ImportError("megatron-core is not installed (pip install megatron-core)")
            sys.modules["megatron.core"] = importlib.util.module_from_spec(spec)
            importlib.import_module("megatron.core.parallel_state")
        return importlib.import_module(f"megatron.core.datasets.{name}")


def megatron_indexed():
    """megatron-core's indexed_dataset module (see megatron_data_module)."""
    indexed_dataset = megatron_data_module("indexed_dataset")
    # It logs a dozen INFO lines per dataset opened; keep them out of training logs.
    logging.getLogger(indexed_dataset.__name__).setLevel(logging.WARNING)
    return indexed_dataset


def open_indexed(prefix, vocab_size: int | None = None):
    """Open PREFIX.bin/.idx as a megatron IndexedDataset, turning every way it can be broken
    (missing half, truncated or corrupt index, .bin not matching the index, token ids beyond the
    tokenizer's vocabulary) into a one-line DataError naming the file."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if not idx_path.is_file():
        raise DataError(f"{idx_path}: index file missing (found {bin_path} without its .idx; "
                        f"re-run `keel data preprocess`)")
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: data file missing (found {idx_path} without its .bin; "
                        f"re-run `keel data preprocess`)")
    module = megatron_indexed()
    try:
        ds = module.IndexedDataset(str(prefix))
        index = ds.index
        ok = len(index.document_indices) >= 1 and index.document_indices[0] == 0
    except Exception as e:  # megatron signals a bad index with assert/ValueError/struct.error
        raise DataError(f"{idx_path}: truncated or corrupt index file "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    if not ok:
        raise DataError(f"{idx_path}: corrupt index file (document indices do not start at 0)")
    itemsize = np.dtype(index.dtype).itemsize
    expected = 0
    if len(index.sequence_lengths):
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(f"{bin_path}: holds {actual} bytes but its .idx describes {expected} "
                        f"(truncated, or .bin and .idx come from different runs)")
    if vocab_size is not None and actual:
        tokens = np.memmap(bin_path, dtype=index.dtype, mode="r")
        top = max(int(tokens[:_VOCAB_CHECK_TOKENS].max()), int(tokens[-_VOCAB_CHECK_TOKENS:].max()))
        if top >= vocab_size:
            raise DataError(f"{bin_path}: token id {top} >= tokenizer vocab size {vocab_size} "
                            f"(was it preprocessed with another tokenizer?)")
    return ds


def num_documents(prefix) -> int:
    return len(open_indexed(prefix).document_indices) - 1


def split_documents(prefix, eval_fraction: float) -> tuple[range, range]:
    """(train, eval) document ranges: the last eval_count(n_docs) documents are eval. Splitting by
    documents, not windows, keeps eval text unseen in training."""
    n_docs = num_documents(prefix)
    n_eval = eval_count(n_docs, eval_fraction)
    return range(0, n_docs - n_eval), range(n_docs - n_eval, n_docs)


def eval_count(n: int, eval_fraction: float) -> int:
    """How many of n documents (or SFT examples) to hold out: ceil(fraction * n), at least one
    when the fraction is > 0, never all of them."""
    if eval_fraction <= 0 or n <= 1:
        return 0
    # The small epsilon keeps e.g. 0.07 * 100 = 7.000000000000001 from becoming 8.
    return min(max(1, math.ceil(eval_fraction * n - 1e-9)), n - 1)


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, prefix, seq_len: int, documents: range | None = None, document_mask: bool = True):
        self.prefix = Path(prefix)
        self.seq_len = int(seq_len)
        self.document_mask = bool(document_mask)
        self.indexed = open_indexed(self.prefix)
        doc_index = np.asarray(self.indexed.document_indices, dtype=np.int64)
        n_docs = len(doc_index) - 1
        self.documents = range(n_docs) if documents is None else documents
        if self.documents.step != 1 or self.documents.start < 0 or self.documents.stop > n_docs:
            raise ValueError(f"documents must be a contiguous range inside [0, {n_docs}), "
                             f"got {self.documents}")
        # A document may hold several sequences (megatron allows it); our stream is made of the
        # sequences of the chosen documents, in order.
        self._seq0 = int(doc_index[self.documents.start]) if len(self.documents) else 0
        seq1 = int(doc_index[self.documents.stop]) if len(self.documents) else 0
        lengths = np.asarray(self.indexed.sequence_lengths[self._seq0:seq1], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each sequence
        seqs = np.arange(self._seq0, seq1)
        doc_of_seq = np.searchsorted(doc_index, seqs, side="right") - 1
        self._doc_of_seq = doc_of_seq
        self._doc_start = self._cum[doc_index[doc_of_seq] - self._seq0]  # stream offset of its doc
        self.num_tokens = int(self._cum[-1])
        self._len = max(0, (self.num_tokens - 1) // self.seq_len)
        if self._len == 0:
            raise DataError(
                f"{self.prefix}: documents {self.documents.start}..{self.documents.stop - 1} hold "
                f"{self.num_tokens} tokens, fewer than seq_len + 1 = {self.seq_len + 1} needed for "
                f"one sample")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        start, end = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        # Sequences k with cum[k] <= start < cum[k+1] up to the one holding token end-1.
        k0 = int(np.searchsorted(self._cum, start, side="right")) - 1
        k1 = int(np.searchsorted(self._cum, end, side="left"))
        pieces, owners = [], []
        for k in range(k0, k1):
            lo, hi = max(start, int(self._cum[k])), min(end, int(self._cum[k + 1]))
            if hi <= lo:
                continue  # an empty sequence
            pieces.append(self.indexed.get(self._seq0 + k, offset=lo - int(self._cum[k]), length=hi - lo))
            owners.append(np.full(hi - lo, k, dtype=np.int64))
        window = np.concatenate(pieces).astype(np.int64)
        owner = np.concatenate(owners)
        if self.document_mask:
            positions = np.arange(start, end, dtype=np.int64) - self._doc_start[owner]
            doc_ids = self._doc_of_seq[owner]
        else:  # one row, as if a single document
            positions = np.arange(end - start, dtype=np.int64)
            doc_ids = np.zeros(end - start, dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(window[1:].copy()),
            "positions": torch.from_numpy(positions[:-1].copy()),
            "doc_ids": torch.from_numpy(doc_ids[:-1].copy()),
        }

    def __repr__(self) -> str:
        return (f"PackedDataset({self.prefix}, seq_len={self.seq_len}, documents={self.documents}, "
                f"samples={self._len}, document_mask={self.document_mask})")
