"""S²GR's training task: OneRec's generative task plus what the thoughts are aligned with.

From the SID table's code vectors (written by `keel sid build`; CoBa RQ-VAE in the S²GR recipes) it
derives, once at prepare: K_c coarse centres per quantised level (seeded faiss k-means of that level's
code vectors), each item's coarse cluster per level, and each item's quantised vector (the sum of its
code vectors). Batches carry the target's rows of those tables and the centres.
"""
from __future__ import annotations

import numpy as np
import torch

from keel.errors import ConfigError, DataError
from keel.model.rec_task import GenerativeRecTask, _fill, sid_table_path
from keel.model.semantic_ids import SidTable, kmeans


def coarse_clusters(codebook: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centres [K_c, d], cluster of each code [K]) of one level's code vectors [K, d]."""
    # A few dozen code vectors into a handful of centres is meant to be small: no thin-data warning.
    km = kmeans(np.ascontiguousarray(codebook, dtype=np.float32), n_clusters, iters=25, seed=seed,
                min_points_per_centroid=1)
    return km.centroids.astype(np.float32), km.index.search(np.ascontiguousarray(codebook, np.float32), 1)[1][:, 0]


def alignment_tables(table: SidTable, n_clusters: int, seed: int):
    """centres [Lq, K_c, d], item clusters [n_items + 1, Lq], item code vectors [n_items + 1, d]
    (row 0, the padding item, zeros) for the Lq levels that have code vectors."""
    levels = len(table.codebooks)
    centres, clusters = zip(*(coarse_clusters(c, n_clusters, seed + level) for level, c in enumerate(table.codebooks)))
    sids = table.sids[:, :levels]
    item_clusters = np.stack([clusters[level][sids[:, level]] for level in range(levels)], 1).astype(np.int64)
    vectors = sum(table.codebooks[level][sids[:, level]] for level in range(levels)).astype(np.float32)
    item_clusters[0], vectors[0] = 0, 0.0
    return np.stack(centres), item_clusters, vectors


class S2GRTask(GenerativeRecTask):
    centres = item_clusters = item_vectors = None

    def prepare(self) -> None:
        super().prepare()
        thinking = self.cfg.model.s2gr
        if not thinking.thinking:
            return
        table = self.table
        if not table.codebooks:
            raise DataError(f"recsys.sid_table: {sid_table_path(self.rec)} has no code vectors (built by an older "
                            f"keel); rebuild it with `keel sid build RECIPE`")
        smallest = min(c.shape[0] for c in table.codebooks)
        if thinking.align_clusters > smallest:
            raise ConfigError(f"model.s2gr.align_clusters: {thinking.align_clusters} coarse clusters of a level "
                              f"with {smallest} codes; expected at most {smallest}")
        centres, clusters, vectors = alignment_tables(table, thinking.align_clusters, self.rec.sid.seed)
        self.centres, self.item_clusters, self.item_vectors = map(torch.from_numpy, (centres, clusters, vectors))
        _fill(self.cfg.model, "code_dim", int(vectors.shape[1]))
        _fill(self.cfg.model, "code_levels", len(table.codebooks))

    def with_inputs(self, batch: dict) -> dict:
        batch = super().with_inputs(batch)
        if self.centres is None or "align_centres" in batch:
            return batch
        device = batch["targets"].device
        if self.centres.device != device:
            self.centres, self.item_clusters, self.item_vectors = (
                t.to(device) for t in (self.centres, self.item_clusters, self.item_vectors))
        targets = batch["targets"]
        return {**batch, "align_centres": self.centres, "target_clusters": self.item_clusters[targets],
                "target_code_vectors": self.item_vectors[targets]}

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        batch = super().fake_batch(rows, cp)
        model = self.cfg.model
        if model.s2gr.thinking:
            targets = batch["targets"]
            batch["align_centres"] = torch.zeros(model.code_levels, model.s2gr.align_clusters, model.code_dim)
            batch["target_clusters"] = torch.zeros(*targets.shape, model.code_levels, dtype=torch.long)
            batch["target_code_vectors"] = torch.zeros(*targets.shape, model.code_dim)
        return batch

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Beside the loss (which holds the auxiliary terms): the codes' NTP loss alone, comparable
        with TIGER's eval_loss."""
        sums = super().eval_sums(model, batch)
        inputs = self.with_inputs(batch)
        valid = inputs["targets"] != 0
        nll = -model.code_logprobs(inputs, inputs["target_sids"]).mean(-1)
        sums["ntp"] = (nll * valid).sum().float()
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        return {**super().eval_metrics(sums), "eval_ntp": sums["ntp"] / max(sums["units"], 1)}
