"""The training loop's view of the data: batches per optimizer step, eval batches, resumable state.

`build_train_data` turns the recipe's `data:` section into a TrainData: every source is resolved
(tokenized into the cache if needed), split into train/eval by whole documents (SFT: by examples),
and the train parts are blended by weight. Batches are read in-process from memory-mapped files;
a step's micro-batches for this rank come from the GlobalBatchSampler, which alone decides the
order and is all that needs checkpointing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from keel.data.blend import BlendedDataset
from keel.data.config import DataConfig
from keel.data.packed import PackedDataset, eval_count, split_documents
from keel.data.preprocess import resolve_source
from keel.data.sampler import GlobalBatchSampler
from keel.data.sft import SFTDataset
from keel.data.tokenizer import Tokenizer
from keel.errors import DataError


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length samples into [batch, seq_len] tensors, key by key."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class TrainData:
    def __init__(self, train_dataset, eval_dataset, sampler: GlobalBatchSampler,
                 sources: list | None = None):
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset  # None when data.eval_fraction is 0
        self.sampler = sampler
        self.sources = sources or []  # resolved prefixes / files, for logging

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's collated micro-batches for one optimizer step."""
        return [collate([self.train_dataset[i] for i in micro]) for micro in self.sampler.next_step()]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)

    def eval_batches(self, n_batches: int, micro_batch: int, dp_rank: int,
                     dp_size: int) -> list[dict[str, torch.Tensor]]:
        """`n_batches` micro-batches for this rank, the same every call. Every rank gets the same
        count (FSDP forwards are collective); the n_batches * micro_batch * dp_size eval samples are
        spread evenly over the eval set rather than taken from its start, since neighbouring
        windows come from the same document."""
        if self.eval_dataset is None or n_batches <= 0:
            return []
        total, size = n_batches * micro_batch * dp_size, len(self.eval_dataset)
        positions = np.arange(total, dtype=np.int64)
        chosen = positions * size // total if total <= size else positions % size
        per_rank = n_batches * micro_batch
        mine = chosen[dp_rank * per_rank:(dp_rank + 1) * per_rank].tolist()
        return [collate([self.eval_dataset[i] for i in mine[j:j + micro_batch]])
                for j in range(0, per_rank, micro_batch)]

    def __repr__(self) -> str:
        n_eval = 0 if self.eval_dataset is None else len(self.eval_dataset)
        return f"TrainData(train={len(self.train_dataset)} samples, eval={n_eval} samples, {self.sampler})"


def _combine(datasets: list, weights: list[float]):
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, weights)


def _pretrain_splits(cfg: DataConfig, tokenizer: Tokenizer, cache_dir, progress: bool):
    trains, evals, sources = [], [], []
    for i, source in enumerate(cfg.sources):
        prefix = resolve_source(source.path, tokenizer, cache_dir, text_key=cfg.text_key,
                                progress=progress)
        sources.append(prefix)
        train_docs, eval_docs = split_documents(prefix, cfg.eval_fraction)
        trains.append(PackedDataset(prefix, cfg.seq_len, train_docs, cfg.document_mask))
        if len(eval_docs):
            try:
                evals.append((PackedDataset(prefix, cfg.seq_len, eval_docs, cfg.document_mask),
                              source.weight))
            except DataError as e:
                raise DataError(f"{e} (the eval split of data.sources[{i}]; raise "
                                f"data.eval_fraction, lower data.seq_len, or set data.eval_fraction "
                                f"to 0)") from None
    return trains, evals, sources


def _sft_splits(cfg: DataConfig, tokenizer: Tokenizer):
    trains, evals, sources = [], [], []
    for source in cfg.sources:
        path = Path(source.path).expanduser()
        if path.suffix != ".jsonl":
            raise DataError(f"{source.path}: an SFT source must be a .jsonl file of prompt/response "
                            f"or messages records (data.format is sft)")
        full = SFTDataset(path, tokenizer, cfg.seq_len)
        sources.append(path)
        n_eval = eval_count(len(full), cfg.eval_fraction)
        trains.append(torch.utils.data.Subset(full, range(0, len(full) - n_eval)))
        if n_eval:
            evals.append((torch.utils.data.Subset(full, range(len(full) - n_eval, len(full))),
                          source.weight))
    return trains, evals, sources


def build_train_data(cfg_data: DataConfig, tokenizer: Tokenizer, *, global_batch: int,
                     micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                     cache_dir: Path | None = None, progress: bool = True) -> TrainData:
    """Datasets and this rank's sampler for a recipe's `data:` section. `cache_dir` None means
    data.cache_dir, else $KEEL_HOME/data."""
    if not cfg_data.sources:
        raise DataError("data.sources: at least one data source is required")
    if cache_dir is None and cfg_data.cache_dir:
        cache_dir = Path(cfg_data.cache_dir)
    if cfg_data.format == "sft":
        trains, evals, sources = _sft_splits(cfg_data, tokenizer)
    else:
        trains, evals, sources = _pretrain_splits(cfg_data, tokenizer, cache_dir, progress)
    train = _combine(trains, [s.weight for s in cfg_data.sources])
    # Eval mixes the sources by the same weights, so eval loss measures the training objective.
    evaluation = _combine([d for d, _ in evals], [w for _, w in evals]) if evals else None
    sampler = GlobalBatchSampler(len(train), global_batch, micro_batch, dp_rank, dp_size, seed,
                                 shuffle=cfg_data.shuffle)
    return TrainData(train, evaluation, sampler, sources)
