"""Semantic IDs by RQ-KMeans (OneRec §3.1): item embeddings -> a unique L-code path per item.

Level l runs k-means (faiss) on the residual R^(l), assigns each item its nearest centroid and
passes R^(l+1) = R^(l) - c^(l)_{s^l} on. Two options beyond the paper:
  balanced last level  the last k-means level assigns items to codes under equal capacities
                       (sizes floor(n/K) or ceil(n/K)), so no code of the deepest level is crowded;
  de-duplication       (TIGER/GRID) items that still share a full path get one extra code 0,1,2,...
                       in item order; that level's size is the largest collision group.

Indexing follows the recsys convention: embeddings and the table have one row per item index
0..n_items, row 0 being the padding item (ignored on input, all zeros in the table).
The table is saved as .npz (no pickles: report and config travel as JSON strings).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from keel.errors import ConfigError, DataError, MissingExtraError

TABLE_FORMAT = 1


@dataclass
class SidTable:
    """sids int64 [n_items + 1, L] (row 0 zeros; codes of level t in [0, sid_levels[t])), the
    codebook size per level (de-dup level last), raw item ids (index 0 = ""), the build report,
    the settings it was built with and the code vectors of each quantised level ([K, d] per
    level, de-dup level excluded: what S²GR aligns its thoughts with; empty in older tables)."""
    sids: np.ndarray
    sid_levels: list[int]
    item_ids: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    codebooks: list[np.ndarray] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return self.sids.shape[0] - 1

    def save(self, path) -> Path:
        """Atomic: a temp file in the same folder, then os.replace, so a reader never sees half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.int64(TABLE_FORMAT), sids=self.sids.astype(np.int64),
                         sid_levels=np.asarray(self.sid_levels, dtype=np.int64),
                         item_ids=np.asarray(self.item_ids or [""] * (self.n_items + 1), dtype=str),
                         report=np.asarray(json.dumps(self.report)), config=np.asarray(json.dumps(self.config)),
                         **{f"codebook_{i}": np.asarray(c, dtype=np.float32) for i, c in enumerate(self.codebooks)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, item_ids: Optional[Sequence[str]] = None, key: str = "recsys.sid_table") -> "SidTable":
        """Read a table; with `item_ids` (index 0 = ""), refuse one built for another catalogue."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{key}: SID table {path} does not exist; build it with `keel sid build RECIPE`")
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                table = cls(sids=z["sids"].astype(np.int64), sid_levels=[int(v) for v in z["sid_levels"]],
                            item_ids=[str(s) for s in z["item_ids"]], report=json.loads(str(z["report"])),
                            config=json.loads(str(z["config"])),
                            codebooks=[z[f"codebook_{i}"] for i in range(len(z["sid_levels"])) if f"codebook_{i}" in z])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{key}: {path} is not a keel SID table ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); rebuild it with `keel sid build RECIPE`") from None
        if fmt != TABLE_FORMAT:
            raise DataError(f"{key}: {path} has table format {fmt}, this keel reads {TABLE_FORMAT}; rebuild it")
        s = table.sids
        if s.ndim != 2 or s.shape[1] != len(table.sid_levels) or (s.shape[0] > 1 and (
                (s < 0).any() or (s >= np.asarray(table.sid_levels)).any())):
            raise DataError(f"{key}: {path} is inconsistent (sids {s.shape} vs levels {table.sid_levels}); rebuild it")
        if item_ids is not None and list(item_ids) != table.item_ids:
            n_same = sum(a == b for a, b in zip(item_ids, table.item_ids))
            raise DataError(f"{key}: {path} was built for another catalogue ({table.n_items} items, "
                            f"{n_same} ids in place, the data has {len(item_ids) - 1} items); "
                            f"rebuild it with `keel sid build RECIPE`")
        return table


def _faiss():
    try:
        import faiss  # heavy native library: only when a table is built
    except ImportError:
        raise MissingExtraError("semantic IDs need faiss: `pip install faiss-cpu`") from None
    return faiss


def kmeans(x: np.ndarray, k: int, iters: int, seed: int, min_points_per_centroid: int = 39):
    """Seeded faiss k-means on x; its index answers nearest-centroid queries without an [n, k]
    distance matrix (3 x 8192 over a million items would not fit). Below min_points_per_centroid
    points per centroid faiss warns (on stderr) that the clustering is thin."""
    faiss = _faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                      min_points_per_centroid=min_points_per_centroid)
    km.train(x)
    return km


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1, keepdims=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None]
    return np.maximum(d, 0.0)


def _fill(dist: np.ndarray, owner: np.ndarray, counts: np.ndarray, cap: np.ndarray) -> None:
    """Capacity-constrained greedy, in rounds: each unplaced item proposes its nearest code with
    room; each code takes its closest proposers up to its room (ties by item index). Every round
    places at least one item; stops when all are placed or no code has room. In place."""
    while True:
        todo = np.flatnonzero(owner < 0)
        room = cap - counts
        if todo.size == 0 or not (room > 0).any():
            return
        d = np.where(room[None] > 0, dist[todo], np.inf)
        choice = d.argmin(1)
        best = d[np.arange(todo.size), choice]
        order = np.lexsort((todo, best, choice))  # by code, then distance, then item index
        code = choice[order]
        rank = np.arange(code.size) - np.searchsorted(code, code, side="left")
        take = order[rank < room[code]]
        owner[todo[take]] = choice[take]
        counts += np.bincount(choice[take], minlength=counts.size)


def balanced_assign(dist: np.ndarray) -> np.ndarray:
    """Codes [n] for distances [n, K] with every code holding floor(n/K) or ceil(n/K) items:
    first fill every code to floor(n/K), then place the n mod K left over at most one per code."""
    n, k = dist.shape
    owner = np.full(n, -1, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    _fill(dist, owner, counts, np.full(k, n // k, dtype=np.int64))
    _fill(dist, owner, counts, np.full(k, n // k + 1, dtype=np.int64))
    return owner


def dedup_codes(paths: np.ndarray) -> np.ndarray:
    """0,1,2,... for the items sharing each full path, in item order (stable)."""
    _, group = np.unique(paths, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    g = group[order]
    rank = np.arange(g.size) - np.searchsorted(g, g, side="left")
    out = np.empty_like(rank)
    out[order] = rank
    return out


def _entropy_bits(codes: np.ndarray, k: int) -> float:
    p = np.bincount(codes, minlength=k) / max(codes.size, 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def check_inputs(embeddings, levels: int, codebook: int, key: str) -> np.ndarray:
    """The items' rows x [n_items, d] (padding row dropped) after the checks every SID builder makes."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < 2 or not np.isfinite(emb).all():
        raise DataError(f"{key}.embedding: item embeddings must be a finite [n_items + 1, d] array, got {emb.shape}")
    x = np.ascontiguousarray(emb[1:])
    n = x.shape[0]
    if levels < 1:
        raise ConfigError(f"{key}.levels: {levels}; expected at least 1")
    if codebook < 1 or codebook > n:
        raise ConfigError(f"{key}.codebook: {codebook} codes per level for a catalogue of {n} items; "
                          f"expected 1..{n} (k-means cannot fill more centroids than items)")
    return x


def assemble_table(x: np.ndarray, residual: np.ndarray, codes: list[np.ndarray], vectors: list[np.ndarray],
                   codebook: int, *, dedup: bool, item_ids: Optional[Sequence[str]], config: dict,
                   key: str) -> SidTable:
    """The SidTable of per-level codes [n] (items 1..n) quantising x [n, d] with `residual` left:
    collision rate, the de-dup level (or the refusal when dedup is off and paths collide), the
    report and the table; shared by every SID builder so their reports mean the same."""
    n = x.shape[0]
    paths = np.stack(codes, 1)
    _, group, sizes = np.unique(paths, axis=0, return_inverse=True, return_counts=True)
    shared = sizes[group.reshape(-1)] > 1
    sid_levels = [codebook] * len(codes)
    if dedup:
        extra = dedup_codes(paths)
        paths = np.concatenate([paths, extra[:, None]], 1)
        sid_levels.append(int(sizes.max()))
    elif shared.any():
        raise ConfigError(f"{key}.dedup: false but {int(shared.sum())} items share a full SID path; "
                          f"set dedup: true or raise {key}.codebook / {key}.levels")
    norm = (x * x).sum(1)
    err = (residual * residual).sum(1)
    nz = norm > 0
    last = np.bincount(codes[-1], minlength=codebook)
    report = {
        "n_items": n, "utilisation": [float(np.unique(c).size / codebook) for c in codes],
        "entropy_bits": [_entropy_bits(c, codebook) for c in codes],
        "collision_rate": float(shared.mean()), "dedup_size": int(sizes.max()),
        "recon_error": float(err.sum() / max(norm.sum(), 1e-30)),
        "recon_error_mean": float((err[nz] / norm[nz]).mean()) if nz.any() else 0.0,
        "last_level_sizes": [int(last.min()), int(last.max())],
    }
    sids = np.zeros((n + 1, len(sid_levels)), dtype=np.int64)
    sids[1:] = paths
    ids = list(item_ids) if item_ids is not None else [""] + [str(i) for i in range(1, n + 1)]
    return SidTable(sids=sids, sid_levels=sid_levels, item_ids=ids, report=report, config=config,
                    codebooks=[np.asarray(v, dtype=np.float32) for v in vectors])


def rq_kmeans(embeddings: np.ndarray, levels: int = 3, codebook: int = 32, *, iters: int = 20, seed: int = 0,
              balanced_last: bool = False, dedup: bool = True, item_ids: Optional[Sequence[str]] = None,
              key: str = "recsys.sid") -> SidTable:
    """RQ-KMeans semantic IDs for embeddings [n_items + 1, d] (row 0 = padding, ignored).

    Report: per k-means level `utilisation` (used codes / codebook) and `entropy_bits`;
    `collision_rate` = fraction of items whose k-means path is shared with another item (before
    de-dup); `recon_error` = sum_i ||x_i - sum_l c_l||^2 / sum_i ||x_i||^2 (ratio of sums, so items
    with a zero embedding do not divide by zero) and `recon_error_mean` = the mean of the per-item
    ratio over items with a non-zero embedding; `dedup_size` = the largest collision group.
    """
    x = check_inputs(embeddings, levels, codebook, key)
    residual = x.copy()
    codes, vectors = [], []
    for level in range(levels):
        km = kmeans(residual, codebook, iters, seed + level)
        centroids = km.centroids.astype(np.float32)
        if balanced_last and level == levels - 1:
            code = balanced_assign(_sq_dist(residual, centroids))
            # re-centre on the members actually assigned, which lowers the residual
            sums = np.zeros_like(centroids)
            np.add.at(sums, code, residual)
            counts = np.bincount(code, minlength=codebook)
            centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        else:
            code = km.index.search(residual, 1)[1][:, 0]
        residual -= centroids[code]
        vectors.append(centroids)
        codes.append(code.astype(np.int64))
    config = {"levels": levels, "codebook": codebook, "iters": iters, "seed": seed,
              "balanced_last": balanced_last, "dedup": dedup, "dim": int(x.shape[1])}
    return assemble_table(x, residual, codes, vectors, codebook, dedup=dedup, item_ids=item_ids,
                          config=config, key=key)
