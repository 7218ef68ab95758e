"""Recommendation logs, the per-user leave-one-out split, and OneRec-V2 "new impression only" samples.

Logs are RecBole atomic files: P.inter (required), P.item and P.user (optional), tab-separated, the
header naming each column as `name:type` (token, token_seq, float, float_seq). P.inter needs user_id,
item_id and timestamp; rating, duration and play_time (alias playtime) are read when present.
`ml-100k` is RecBole 1.2.1's copy of MovieLens-100K (`keel fetch ml-100k`, else read in place from the
installed package, which is never imported: its dependencies are absent).

Split (per user, interactions stably sorted by timestamp, so equal timestamps keep the file's order):
the last interaction is the test target, the second-to-last the validation target, the rest train.
Users with fewer than 3 interactions are all train and have no eval sample (one train item would
leave nothing to predict it from, and a valid/test target without context measures popularity only).

Samples (keel's batch dict, see RecSamples): training uses every train position t >= 1 of a user's
train sequence as the newest impression, the C items before it as context; with common_context K the
targets t..t+K-1 share one context and t steps by K. Validation's context is the train items, test's
the train items and the validation item. No sample's context holds an item at or after its target.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from keel.data.assets import asset_path
from keel.data.loader import TrainData, collate
from keel.data.rec_config import RecsysConfig
from keel.data.sampler import GlobalBatchSampler
from keel.errors import DataError, MissingAssetError

BUILTIN_DATASETS = {"ml-100k": ("dataset_example", "ml-100k", "ml-100k")}  # path inside the recbole package
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
# MovieLens' own age groups (the ML-1M bins): <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 1..7.
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
MIN_EVAL_INTERACTIONS = 3
MAX_RATING = 5  # ratings are rounded and clipped into 1..5 (their embedding table has 6 rows)


# ---------------------------------------------------------------- atomic files

def read_atomic(path: Path, numeric: tuple[str, ...] = ()) -> dict[str, list]:
    """The columns of a RecBole atomic file by name (type suffix dropped); `numeric` columns (those
    present) parsed as floats. A malformed row is a DataError naming FILE:LINE."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    header = lines[0].rstrip("\r").split("\t")
    names = []
    for col in header:
        name, _, kind = col.partition(":")
        if not name or kind not in ATOMIC_TYPES:
            raise DataError(f"{path}:1: header column {col!r} is not name:type with type one of "
                            f"{list(ATOMIC_TYPES)}")
        names.append(name)
    columns: dict[str, list] = {name: [] for name in names}
    wanted = [(j, name) for j, name in enumerate(names) if name in numeric]
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataError(f"{path}:{number}: expected {len(names)} tab-separated fields "
                            f"({', '.join(names)}), got {len(fields)}")
        for name, value in zip(names, fields):
            columns[name].append(value)
        for j, name in wanted:
            try:
                value = float(fields[j])
            except ValueError:
                raise DataError(f"{path}:{number}: {name} {fields[j]!r} is not a number") from None
            if not math.isfinite(value):
                raise DataError(f"{path}:{number}: {name} {fields[j]!r} is not a finite number")
            columns[name][-1] = value
    return columns


def resolve_dataset(name_or_prefix: str) -> Path:
    """The path prefix P of P.inter for `ml-100k` (the fetched copy, else the installed recbole
    package's) or for a given prefix (a trailing .inter is allowed)."""
    if name_or_prefix in BUILTIN_DATASETS:
        parts = BUILTIN_DATASETS[name_or_prefix]
        try:
            return asset_path(name_or_prefix) / parts[-1]
        except MissingAssetError:
            pass
        spec = importlib.util.find_spec("recbole")  # locates the package without importing it
        prefix = Path(spec.origin).parent.joinpath(*parts) if spec and spec.origin else None
        if prefix is None or not Path(f"{prefix}.inter").is_file():
            raise DataError(f"recsys.dataset: {name_or_prefix} comes from PyPI recbole==1.2.1, which is "
                            f"not installed; run `pip install --no-deps recbole==1.2.1` "
                            f"(or `bash scripts/setup.sh`)")
        return prefix
    prefix = Path(name_or_prefix).expanduser()
    if prefix.suffix == ".inter":
        prefix = prefix.with_suffix("")
    if not Path(f"{prefix}.inter").is_file():
        raise DataError(f"{prefix}.inter: not found (recsys.dataset is `ml-100k` or a path prefix P of "
                        f"P.inter [+ P.item, P.user])")
    return prefix


# ---------------------------------------------------------------- the log

def _index(raw: list[str]) -> tuple[list[str], np.ndarray]:
    """1-based indices of raw ids: by numeric value when every id is a number (so ML-100K's index is
    its id), else by first appearance. Returns (index -> raw id with [0] = "", indices)."""
    unique = list(dict.fromkeys(raw))
    if all(r.isdigit() for r in unique):
        unique.sort(key=int)
    lookup = {r: i + 1 for i, r in enumerate(unique)}
    return [""] + unique, np.fromiter((lookup[r] for r in raw), dtype=np.int64, count=len(raw))


def _categories(values: list[str]) -> tuple[dict[str, int], int]:
    vocab = sorted({v for v in values if v})
    return {v: i + 1 for i, v in enumerate(vocab)}, len(vocab) + 1


@dataclass
class InteractionLog:
    """One log, in file order. Users 1..n_users and items 1..n_items (0 = padding/unknown)."""
    source: str
    user_ids: list[str]  # index -> raw id as in the file ([0] = "")
    item_ids: list[str]
    user: np.ndarray  # int64 [n], per interaction
    item: np.ndarray  # int64 [n]
    timestamp: np.ndarray  # float64 [n], seconds
    rating: Optional[np.ndarray]  # float64 [n] or None
    duration: Optional[np.ndarray]  # float64 [n] (item length) or None
    play_time: Optional[np.ndarray]  # float64 [n] (time watched) or None
    user_feats: dict[str, np.ndarray]  # feature -> int64 [n_users + 1], 0 = unknown
    user_feat_sizes: dict[str, int]  # feature -> embedding rows (incl. 0)
    item_text: list[str]  # [n_items + 1] "title (year) genres" for content embeddings ([0] = "")

    @property
    def n_users(self) -> int:
        return len(self.user_ids) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def __len__(self) -> int:
        return len(self.user)


def _column(cols: dict, names: tuple[str, ...]):
    return next((cols[n] for n in names if n in cols), None)


def load_log(prefix) -> InteractionLog:
    """Read P.inter (+ P.user, P.item when present) into an InteractionLog."""
    prefix = Path(prefix)
    inter = Path(f"{prefix}.inter")
    numeric = ("timestamp", "rating", "duration", "play_time", "playtime")
    cols = read_atomic(inter, numeric)
    for name in ("user_id", "item_id", "timestamp"):
        if name not in cols:
            raise DataError(f"{inter}:1: missing column {name} (header has {list(cols)}; need "
                            f"user_id, item_id, timestamp)")
    if not cols["user_id"]:
        raise DataError(f"{inter}: no interactions")
    for name in ("user_id", "item_id"):
        if "" in cols[name]:
            raise DataError(f"{inter}:{cols[name].index('') + 2}: empty {name}")
    user_ids, user = _index(cols["user_id"])
    item_ids, item = _index(cols["item_id"])

    def floats(names):
        col = _column(cols, names)
        return None if col is None else np.asarray(col, dtype=np.float64)

    user_feats, sizes = _user_features(Path(f"{prefix}.user"), user_ids)
    return InteractionLog(
        source=str(prefix), user_ids=user_ids, item_ids=item_ids, user=user, item=item,
        timestamp=np.asarray(cols["timestamp"], dtype=np.float64), rating=floats(("rating",)),
        duration=floats(("duration",)), play_time=floats(("play_time", "playtime")),
        user_feats=user_feats, user_feat_sizes=sizes, item_text=_item_text(Path(f"{prefix}.item"), item_ids))


def _user_features(path: Path, user_ids: list[str]) -> tuple[dict, dict]:
    n = len(user_ids)
    feats = {"user": np.arange(n, dtype=np.int64), "age": np.zeros(n, np.int64),
             "gender": np.zeros(n, np.int64), "occupation": np.zeros(n, np.int64)}
    sizes = {"user": n, "age": len(AGE_EDGES) + 2, "gender": 1, "occupation": 1}
    if not path.is_file():
        return feats, sizes
    cols = read_atomic(path)
    if "user_id" not in cols:
        raise DataError(f"{path}:1: missing column user_id (header has {list(cols)})")
    row_of = {raw: i for i, raw in enumerate(user_ids) if i}
    rows = np.array([row_of.get(raw, -1) for raw in cols["user_id"]], dtype=np.int64)
    known = rows >= 0  # profile rows of users without interactions are dropped
    if "age" in cols:
        ages = np.array([float(a) if a.replace(".", "", 1).isdigit() else -1.0 for a in cols["age"]])
        buckets = np.where(ages >= 0, 1 + np.searchsorted(AGE_EDGES, ages, side="right"), 0)
        feats["age"][rows[known]] = buckets[known]
    for name in ("gender", "occupation"):
        if name in cols:
            vocab, sizes[name] = _categories(cols[name])
            codes = np.array([vocab.get(v, 0) for v in cols[name]], dtype=np.int64)
            feats[name][rows[known]] = codes[known]
    return feats, sizes


def _item_text(path: Path, item_ids: list[str]) -> list[str]:
    """"title (year) genres" per item; an item without a row (or no P.item) is "item <raw id>"."""
    texts = [""] + [f"item {raw}" for raw in item_ids[1:]]
    if not path.is_file():
        return texts
    cols = read_atomic(path)
    if "item_id" not in cols:
        raise DataError(f"{path}:1: missing column item_id (header has {list(cols)})")
    n = len(cols["item_id"])
    title = _column(cols, ("movie_title", "title")) or [""] * n
    year = _column(cols, ("release_year", "year")) or [""] * n
    genres = _column(cols, ("class", "genre", "genres")) or [""] * n
    row_of = {raw: i for i, raw in enumerate(item_ids) if i}
    for raw, t, y, g in zip(cols["item_id"], title, year, genres):
        if raw in row_of:
            text = " ".join(p for p in (t.strip(), f"({y.strip()})" if y.strip() else "", g.strip()) if p)
            texts[row_of[raw]] = text or f"item {raw}"
    return texts


# ---------------------------------------------------------------- the split

class LeaveOneOutSplit:
    """The log sorted by (user, timestamp, file order); user u's interactions are positions
    ptr[u]:ptr[u+1], its train part ptr[u]:train_end[u]; the validation target sits at train_end[u],
    the test target at train_end[u] + 1 (users in `eval_users` only)."""

    def __init__(self, log: InteractionLog):
        self.log = log
        order = np.lexsort((np.arange(len(log)), log.timestamp, log.user))
        self.order = order  # sorted position -> log row (for duration, play_time, ...)
        self.items, self.ts = log.item[order], log.timestamp[order]
        rating = np.ones(len(log)) if log.rating is None else log.rating[order]
        self.ratings = np.clip(np.rint(rating), 1, MAX_RATING).astype(np.int64)
        counts = np.bincount(log.user, minlength=log.n_users + 1)
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [n_users + 2]
        has_eval = counts >= MIN_EVAL_INTERACTIONS
        self.train_end = self.ptr[1:] - np.where(has_eval, 2, 0)  # [n_users + 1]
        self.eval_users = np.nonzero(has_eval)[0].astype(np.int64)

    def counts(self) -> dict[str, int]:
        train = self.train_end - self.ptr[:-1]
        return {"train": int(train.sum()), "valid": len(self.eval_users), "test": len(self.eval_users),
                "train_users": int((train > 0).sum()), "eval_users": len(self.eval_users)}

    def target_positions(self, which: str) -> np.ndarray:
        """Sorted-log positions of the eval targets, one per eval user."""
        if which not in ("valid", "test"):
            raise ValueError(f"split {which!r}: expected valid or test")
        return self.train_end[self.eval_users] + (which == "test")

    def history(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """CSR (indptr [n_users + 2], items) of the items each user is known to have had before the
        `which` target (train items; for test also the validation item): masked at eval."""
        if which not in ("valid", "test"):
            raise ValueError(f"split {which!r}: expected valid or test")
        ends = self.train_end + ((self.ptr[1:] > self.train_end) if which == "test" else 0)
        lengths = ends - self.ptr[:-1]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        keep = np.repeat(np.arange(len(lengths)), lengths)
        offsets = np.arange(indptr[-1]) - indptr[keep]
        return indptr, self.items[self.ptr[keep] + offsets]

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(user index, item index) of every train interaction, for collaborative item embeddings."""
        indptr, items = self.history("valid")
        return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), items

    def train_positions(self, common_context: int) -> np.ndarray:
        """Sorted-log positions of the first target of every training sample."""
        starts = [np.arange(self.ptr[u] + 1, self.train_end[u], common_context)
                  for u in range(1, len(self.train_end))]
        return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


# ---------------------------------------------------------------- samples

class RecSamples(torch.utils.data.Dataset):
    """Samples whose first target sits at the given sorted-log positions: the C items before it (of
    the same user) as context, up to K targets before `limit` (train: the user's train end)."""

    def __init__(self, split: LeaveOneOutSplit, positions: np.ndarray, limits: np.ndarray,
                 cfg: RecsysConfig):
        self.split, self.positions, self.limits = split, positions, limits
        self.context_len, self.k, self.gap_buckets = cfg.context_len, cfg.common_context, cfg.gap_buckets
        log = split.log
        self.user_of = np.repeat(np.arange(len(split.ptr) - 1), np.diff(split.ptr))
        columns = [log.user_feats[name] for name in cfg.user_features]
        self.user_feats = np.stack(columns, 1) if columns else np.zeros((log.n_users + 1, 0), np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, p = self.split, int(self.positions[i])
        user = int(self.user_of[p])
        start = max(int(s.ptr[user]), p - self.context_len)  # never before the user's first item
        pad = self.context_len - (p - start)
        ctx_items = np.zeros(self.context_len, np.int64)
        ctx_ratings = np.zeros(self.context_len, np.int64)
        ctx_gaps = np.zeros(self.context_len, np.int64)
        ctx_items[pad:] = s.items[start:p]
        ctx_ratings[pad:] = s.ratings[start:p]
        hours = np.maximum(s.ts[p] - s.ts[start:p], 0.0) / 3600.0
        ctx_gaps[pad:] = 1 + np.minimum(self.gap_buckets - 2, np.floor(np.log2(1.0 + hours))).astype(np.int64)
        targets = np.zeros(self.k, np.int64)
        target_ratings = np.zeros(self.k, np.int64)
        n_targets = min(self.k, int(self.limits[i]) - p)
        targets[:n_targets] = s.items[p:p + n_targets]
        target_ratings[:n_targets] = s.ratings[p:p + n_targets]
        return {"user": torch.tensor(user), "user_feats": torch.from_numpy(self.user_feats[user]),
                "ctx_items": torch.from_numpy(ctx_items), "ctx_ratings": torch.from_numpy(ctx_ratings),
                "ctx_gaps": torch.from_numpy(ctx_gaps), "targets": torch.from_numpy(targets),
                "target_ratings": torch.from_numpy(target_ratings)}


def train_samples(split: LeaveOneOutSplit, cfg: RecsysConfig) -> RecSamples:
    positions = split.train_positions(cfg.common_context)
    users = np.repeat(np.arange(len(split.ptr) - 1), np.diff(split.ptr))[positions]
    return RecSamples(split, positions, split.train_end[users], cfg)


def eval_samples(split: LeaveOneOutSplit, which: str, cfg: RecsysConfig) -> RecSamples:
    """One sample per eval user, in user order, with its single target (targets[1:] = 0)."""
    positions = split.target_positions(which)
    return RecSamples(split, positions, positions + 1, cfg)


# ---------------------------------------------------------------- the training loop's view

class RecData(TrainData):
    """TrainData over a recommendation log: its sampler's training samples, and evaluation over
    every validation (or test) user rather than a sample of eval windows."""

    def __init__(self, cfg: RecsysConfig, log: InteractionLog, split: LeaveOneOutSplit,
                 train_dataset: RecSamples, sampler: GlobalBatchSampler):
        super().__init__(train_dataset, eval_samples(split, "valid", cfg), sampler, [log.source])
        self.cfg, self.log, self.split = cfg, log, split
        self.test_dataset = eval_samples(split, "test", cfg)

    n_users = property(lambda self: self.log.n_users)
    n_items = property(lambda self: self.log.n_items)

    @property
    def user_feature_sizes(self) -> list[int]:
        """Embedding rows per entry of batch["user_feats"], in recsys.user_features order."""
        return [self.log.user_feat_sizes[name] for name in self.cfg.user_features]

    def eval_batches(self, n_batches: int, micro_batch: int, dp_rank: int,
                     dp_size: int) -> list[dict[str, torch.Tensor]]:
        """The WHOLE validation set (n_batches is ignored: ranking metrics are over every user)."""
        return self.split_batches("valid", micro_batch, dp_rank, dp_size)

    def split_batches(self, which: str, micro_batch: int, dp_rank: int,
                      dp_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the valid or test samples: rank r takes a contiguous slice;
        every rank gets the same number of batches (FSDP forwards are collective), the last ones
        filled with padding rows (user 0, all zeros, no targets)."""
        dataset = self.eval_dataset if which == "valid" else self.test_dataset
        per_rank = -(-len(dataset) // dp_size)
        per_rank = -(-per_rank // micro_batch) * micro_batch
        pad = {key: torch.zeros_like(value) for key, value in dataset[0].items()}
        mine = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        rows = [dataset[i] if i < len(dataset) else pad for i in mine]
        return [collate(rows[j:j + micro_batch]) for j in range(0, per_rank, micro_batch)]

    def history(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        return self.split.history(which)

    def __repr__(self) -> str:
        return (f"RecData({self.log.source}: {self.n_users} users, {self.n_items} items, "
                f"train={len(self.train_dataset)} samples, valid={len(self.eval_dataset)}, "
                f"test={len(self.test_dataset)}, {self.sampler})")


def load_split(cfg: RecsysConfig) -> tuple[InteractionLog, LeaveOneOutSplit]:
    log = load_log(resolve_dataset(cfg.dataset))
    return log, LeaveOneOutSplit(log)


def build_rec_data(cfg: RecsysConfig, *, global_batch: int, micro_batch: int, dp_rank: int,
                   dp_size: int, seed: int, shuffle: bool = True) -> RecData:
    """The recipe's `recsys:` section as a RecData with this rank's sampler."""
    log, split = load_split(cfg)
    train = train_samples(split, cfg)
    sampler = GlobalBatchSampler(len(train), global_batch, micro_batch, dp_rank, dp_size, seed, shuffle=shuffle)
    return RecData(cfg, log, split, train, sampler)
