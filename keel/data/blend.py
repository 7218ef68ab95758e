"""Weighted blending of several datasets into one, deterministically.

Megatron's rule: sample i comes from the dataset whose share so far is furthest below its target
weight, and takes that dataset's next sample (wrapping around when it runs out). Any prefix of the
blend therefore matches the weights to within one sample per dataset, with no randomness, so the
blend is identical on every rank and across restarts. The tables are built once with megatron-core's
compiled helper; a lookup is then two array reads.
"""
from __future__ import annotations


import numpy as np
import torch

from keel.data.packed import megatron_data_module
from keel.errors import ConfigError


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, running sample count within that dataset) for each of `size` samples."""
    helpers_cpp = megatron_data_module("helpers_cpp")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index,
                                       np.asarray(weights, dtype=np.float64), len(weights), size, False)
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list, weights: list[float], size: int | None = None):
        if not datasets or len(datasets) != len(weights):
            raise ConfigError(f"data.sources: need one weight per dataset, got {len(datasets)} "
                              f"datasets and {len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ConfigError(f"data.sources: at most {np.iinfo(np.int16).max} sources can be blended")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ConfigError(f"data.sources: every weight must be > 0, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.lengths = np.array([len(d) for d in self.datasets], dtype=np.int64)
        if np.any(self.lengths == 0):
            raise ConfigError(f"data.sources[{int(np.argmin(self.lengths))}]: dataset is empty")
        self.size = int(self.lengths.sum()) if size is None else int(size)
        self.dataset_index, sample_index = blending_indices(self.weights, self.size)
        # A dataset asked for more samples than it has starts again from its beginning.
        self.sample_index = sample_index % self.lengths[self.dataset_index]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]

    def __repr__(self) -> str:
        shares = ", ".join(f"{w:.3f}" for w in self.weights)
        return f"BlendedDataset({len(self.datasets)} datasets, weights=[{shares}], size={self.size})"
