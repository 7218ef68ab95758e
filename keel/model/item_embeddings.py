"""Item embeddings for semantic IDs, chosen by `recsys.sid.embedding` (EMBEDDINGS below):

  collaborative  truncated SVD of the training user x item matrix (1 per distinct pair): item
                 factors V_k * S_k, each row L2-normalised (raw rows scale with popularity and put
                 every rare item near the origin, where they all collide in one SID path)
  content        the real SmolLM2's last hidden states, mean-pooled over each item's text
                 ("Toy Story (1995) Animation Children's Comedy"), cached by the texts' hash
  both           the two, each L2-normalised, concatenated

Every builder returns float32 [n_items + 1, d]; row 0 (the padding item) is zeros.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from keel.data.assets import asset_path, keel_home
from keel.errors import ConfigError, DataError

DENSE_SVD_LIMIT = 50_000_000  # user x item cells; above it a seeded randomized SVD on a sparse matrix


@dataclass
class ItemSource:
    """What the builders read: training interactions as index arrays (users 1..n_users, items
    1..n_items) and, for content, one text per item index (index 0 = "")."""
    n_users: int
    n_items: int
    user_idx: Optional[np.ndarray] = None
    item_idx: Optional[np.ndarray] = None
    texts: Optional[Sequence[str]] = None
    svd_dim: int = 64
    seed: int = 0
    text_model: str = "smollm2"  # `smollm2` (the fetched asset) or an HF model folder
    cache_dir: Optional[Path] = None  # default $KEEL_HOME/cache/item_text_embeddings


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _fix_signs(v: np.ndarray) -> np.ndarray:
    """Singular vectors are defined up to sign: make each column's largest entry positive."""
    pick = np.abs(v).argmax(0)
    return v * np.where(v[pick, np.arange(v.shape[1])] < 0, -1.0, 1.0)[None]


def collaborative_embeddings(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int,
                             dim: int = 64, seed: int = 0) -> np.ndarray:
    """L2-normalised rows of V_k S_k from the truncated SVD of the binary user x item matrix;
    deterministic (dense LAPACK SVD, or torch's randomized SVD under a fixed seed when large)."""
    u, i = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
    if u.shape != i.shape or u.size == 0:
        raise DataError(f"item embeddings: need matching non-empty user/item arrays, got {u.shape} and {i.shape}")
    if u.min() < 1 or u.max() > n_users or i.min() < 1 or i.max() > n_items:
        raise DataError(f"item embeddings: user/item indices outside 1..{n_users} / 1..{n_items}")
    k = min(dim, n_users, n_items)
    if n_users * n_items <= DENSE_SVD_LIMIT:
        m = np.zeros((n_users, n_items), dtype=np.float64)
        m[u - 1, i - 1] = 1.0
        _, s, vt = np.linalg.svd(m, full_matrices=False)
        v, s = vt[:k].T, s[:k]
    else:
        pairs = np.unique(np.stack([u - 1, i - 1]), axis=1)
        m = torch.sparse_coo_tensor(torch.from_numpy(pairs), torch.ones(pairs.shape[1]), (n_users, n_items))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, s_t, v_t = torch.svd_lowrank(m.coalesce(), q=k + 8, niter=4)
        v, s = v_t[:, :k].double().numpy(), s_t[:k].double().numpy()
    out = np.zeros((n_items + 1, dim), dtype=np.float32)
    out[1:, :k] = l2_normalise(_fix_signs(v) * s[None])
    return out


def _text_hash(texts: Sequence[str], model: str, max_length: int) -> str:
    h = hashlib.sha256(f"{model}\0{max_length}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:24]


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def text_embeddings(texts: Sequence[str], model: str = "smollm2", batch_size: int = 32, max_length: int = 64,
                    cache_dir: Optional[Path] = None) -> np.ndarray:
    """Mean-pooled final hidden states [len(texts), hidden] of an HF causal LM (default: the fetched
    real SmolLM2-135M), in fp32 on CPU, cached on disk under the hash of (model, max_length, texts)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else keel_home() / "cache" / "item_text_embeddings"
    cached = cache_dir / f"{_text_hash(texts, model, max_length)}.npy"
    if cached.is_file():
        return np.load(cached)
    from transformers import AutoModel, AutoTokenizer  # seconds to import: only for content embeddings
    folder = asset_path("smollm2") if model == "smollm2" else Path(model)
    if not folder.is_dir():
        raise ConfigError(f"recsys.sid.text_model: {folder} is not a folder of HF model files")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    net = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length)
        hidden = net(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    result = np.concatenate(out).astype(np.float32)
    _atomic_save_npy(cached, result)
    return result


def content_embeddings(src: ItemSource) -> np.ndarray:
    if src.texts is None or len(src.texts) != src.n_items + 1:
        raise DataError(f"recsys.sid.embedding: content embeddings need one text per item (index 0 = \"\"), "
                        f"got {None if src.texts is None else len(src.texts) - 1} for {src.n_items} items")
    emb = text_embeddings(list(src.texts[1:]), src.text_model, cache_dir=src.cache_dir)
    out = np.zeros((src.n_items + 1, emb.shape[1]), dtype=np.float32)
    out[1:] = l2_normalise(emb)
    return out


def _collaborative(src: ItemSource) -> np.ndarray:
    if src.user_idx is None or src.item_idx is None:
        raise DataError("recsys.sid.embedding: collaborative embeddings need the training interactions")
    return collaborative_embeddings(src.user_idx, src.item_idx, src.n_users, src.n_items, src.svd_dim, src.seed)


def _both(src: ItemSource) -> np.ndarray:
    return np.concatenate([_collaborative(src), content_embeddings(src)], axis=1)


EMBEDDINGS: dict[str, Callable[[ItemSource], np.ndarray]] = {
    "collaborative": _collaborative, "content": content_embeddings, "both": _both,
}


def item_embeddings(kind: str, src: ItemSource, key: str = "recsys.sid.embedding") -> np.ndarray:
    """float32 [n_items + 1, d] from the builder `kind` names (see EMBEDDINGS)."""
    builder = EMBEDDINGS.get(kind)
    if builder is None:
        raise ConfigError(f"{key}: unknown item embedding {kind!r}; expected one of {sorted(EMBEDDINGS)}")
    return builder(src)
