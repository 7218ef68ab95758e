"""Which samples each data-parallel rank trains on, step by step, resumable at any world size.

The data order is a function of the global sample position only: position g reads dataset index
perm_e[g % N] with e = g // N and perm_e a permutation seeded by (seed, e). Optimizer step s consumes
positions [s*B, (s+1)*B) for global batch B; rank r of D takes the contiguous slice
[r*B/D, (r+1)*B/D) and splits it into micro-batches. Because nothing depends on D, a checkpoint
stores one number, `consumed_samples`, and resuming with another data-parallel size (and another
gradient-accumulation count) continues with exactly the samples an uninterrupted run would see.
"""
from __future__ import annotations

import numpy as np

from keel.errors import CheckpointError, ConfigError, DataError


class GlobalBatchSampler:
    def __init__(self, dataset_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool = True):
        if dataset_len <= 0:
            raise DataError(f"training dataset is empty ({dataset_len} samples)")
        if micro_batch <= 0 or dp_size <= 0 or global_batch <= 0:
            raise ConfigError(f"train.global_batch: global_batch {global_batch}, micro_batch "
                              f"{micro_batch} and data-parallel size {dp_size} must all be > 0")
        if global_batch % (micro_batch * dp_size):
            raise ConfigError(
                f"train.global_batch: {global_batch} is not divisible by train.micro_batch "
                f"{micro_batch} x data-parallel size {dp_size} = {micro_batch * dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.dataset_len = int(dataset_len)
        self.global_batch = int(global_batch)
        self.micro_batch = int(micro_batch)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.consumed_samples = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.dataset_len

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of one epoch; only the one or two epochs in use are kept."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._perms[epoch] = rng.permutation(self.dataset_len)
            else:
                self._perms[epoch] = np.arange(self.dataset_len)
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices of global sample positions."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.dataset_len
        for epoch in np.unique(epochs):  # a step straddles at most a few epochs
            mask = epochs == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask] % self.dataset_len]
        return out

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for the next optimizer step."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        idx = self.indices(np.arange(start, start + per_rank)).tolist()
        self.consumed_samples += self.global_batch
        return [idx[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        """Resume where a run left off. The saved seed wins over the configured one, so a resumed
        run keeps the data order it started with."""
        try:
            consumed, seed = int(sd["consumed_samples"]), int(sd["seed"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"data sampler state: expected consumed_samples and seed, "
                                  f"got {sd!r}") from None
        if consumed < 0:
            raise CheckpointError(f"data sampler state: consumed_samples {consumed} is negative")
        if seed != self.seed:
            self._perms.clear()
        self.consumed_samples, self.seed = consumed, seed

    def __repr__(self) -> str:
        return (f"GlobalBatchSampler(len={self.dataset_len}, global_batch={self.global_batch}, "
                f"micro_batch={self.micro_batch}, rank={self.dp_rank}/{self.dp_size}, "
                f"consumed={self.consumed_samples})")
