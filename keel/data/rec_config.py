"""The `recsys:` section of a recipe: which interaction log, how samples are cut, how SIDs are built.

Optional: LM recipes have none. Read by keel/data/recsys.py (samples), the SID builder and the
recommendation families; the feature names here are the ones those understand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from keel.config import register_section
from keel.errors import ConfigError

# Per context item: its id embedding, its SID codes, its rating and its time gap to the target.
CONTEXT_FEATURES = ("item", "sid", "rating", "gap")
# Per user: its id embedding and the profile columns of a RecBole-style .user file.
USER_FEATURES = ("user", "age", "gender", "occupation")


@dataclass
class RqVaeConfig:
    """RQ-VAE semantic IDs (recsys.sid.method rq_vae / coba); CoBa's smoothing and codebook terms
    are only read by `coba`, whose paper gives no formulas for them: keel's choices, see rq_vae.py."""
    latent_dim: int = 32  # width of the quantised latent (the code vectors)
    hidden: int = 128  # hidden width of the encoder and decoder MLPs
    steps: int = 3000  # Adam steps over mini-batches of items
    batch: int = 256  # items per step
    lr: float = 1e-3  # Adam learning rate
    commitment: float = 0.25  # beta of the commitment term ||z - sg(c)||^2
    cooc_window: int = 5  # coba: items at most this many steps apart in a user's train history co-occur
    appnp_alpha: float = 0.2  # coba: teleport weight alpha of the APPNP propagation
    appnp_hops: int = 3  # coba: propagation hops K_g (H_align averages H^(0..K_g) with weights alpha(1-alpha)^k)
    uniformity_weight: float = 0.1  # coba: weight of the repulsion between codes of one level closer than the margin
    uniformity_margin: float = 0.5  # coba: repulsion margin, fraction of the level's mean code distance (near 1: codes leave the data)
    balance_strength: float = 0.5  # coba: load balancing: distance scaled by 1 + strength * (usage / mean usage - 1)
    balance_clip: float = 0.5  # coba: that scale's change is clipped to +-balance_clip

    def validate(self, key: str) -> None:
        for name in ("latent_dim", "hidden", "steps", "batch", "cooc_window", "appnp_hops"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.appnp_alpha <= 1:
            raise ConfigError(f"{key}.appnp_alpha: expected a teleport weight in (0, 1], got {self.appnp_alpha}")
        for name in ("lr", "commitment", "uniformity_weight", "uniformity_margin", "balance_strength", "balance_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")


SID_METHODS = ("rq_kmeans", "rq_vae", "coba")


@dataclass
class SidConfig:
    method: Literal["rq_kmeans", "rq_vae", "coba"] = "rq_kmeans"  # RQ-KMeans (OneRec), RQ-VAE, or CoBa RQ-VAE (co-occurrence smoothed, balanced)
    levels: int = 3  # quantisation levels (before the de-duplication level)
    codebook: int = 32  # clusters per level (production OneRec: 8192; must not exceed the catalogue)
    embedding: Literal["collaborative", "content", "both"] = "collaborative"  # SVD of train data, SmolLM2 text, or both
    dedup: bool = True  # append one level numbering items that share a code path, so every SID is unique
    balanced_last: bool = False  # balanced k-means on the last RQ level (fewer collisions)
    svd_dim: int = 64  # width of the collaborative (SVD) item embedding
    kmeans_iters: int = 20  # faiss k-means iterations per level
    seed: int = 0  # seed of the embedding and k-means, so a SID table is reproducible
    vae: RqVaeConfig = field(default_factory=RqVaeConfig)  # methods rq_vae and coba

    def validate(self, key: str = "recsys.sid") -> None:
        if self.method not in SID_METHODS:
            raise ConfigError(f"{key}.method: unknown {self.method!r}; expected one of {list(SID_METHODS)}")
        self.vae.validate(f"{key}.vae")
        for name in ("levels", "svd_dim", "kmeans_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(self, name)}")
        if self.codebook < 2:
            raise ConfigError(f"{key}.codebook: must be >= 2 codes per level, got {self.codebook}")


@dataclass
class RecsysConfig:
    dataset: str = "ml-100k"  # `ml-100k` (RecBole's MovieLens-100K) or a prefix P of P.inter [+ P.item, P.user]
    context_len: int = 50  # most recent earlier items per sample (the context, left-padded)
    context_features: list[str] = field(default_factory=lambda: [*CONTEXT_FEATURES])  # any of item, sid, rating, gap
    user_features: list[str] = field(default_factory=lambda: [*USER_FEATURES])  # any of user, age, gender, occupation
    common_context: int = 1  # K consecutive impressions share one context (OneRec-V2 uses 5)
    gap_buckets: int = 16  # time-gap buckets incl. 0 = padding: 1 + min(n-2, floor(log2(1 + hours)))
    sid_table: Optional[str] = None  # .npz written by `keel sid build`; null = the default place beside the data
    sid: SidConfig = field(default_factory=SidConfig)  # semantic-ID construction (RQ-KMeans)
    eval_topk: list[int] = field(default_factory=lambda: [5, 10, 20])  # K of HR@K and NDCG@K
    mask_history: bool = True  # leave the user's known items out of the ranking at eval (never the target)
    eval_beam: int = 0  # generative families: 0 = exact full ranking of every item; N = beam search of width N

    def validate(self) -> None:
        if not self.dataset:
            raise ConfigError("recsys.dataset: required (`ml-100k` or a path prefix of .inter files)")
        for name in ("context_len", "common_context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"recsys.{name}: must be > 0, got {getattr(self, name)}")
        if self.gap_buckets < 2:
            raise ConfigError(f"recsys.gap_buckets: must be >= 2 (0 = padding), got {self.gap_buckets}")
        _check_names("recsys.context_features", self.context_features, CONTEXT_FEATURES)
        _check_names("recsys.user_features", self.user_features, USER_FEATURES)
        if not ({"item", "sid"} & set(self.context_features)):
            raise ConfigError("recsys.context_features: needs `item` or `sid` (a context item must be "
                              f"identifiable), got {self.context_features}")
        if not self.eval_topk or any(k <= 0 for k in self.eval_topk):
            raise ConfigError(f"recsys.eval_topk: expected a non-empty list of positive K, got {self.eval_topk}")
        if not 0 <= self.eval_beam <= 512:
            raise ConfigError(f"recsys.eval_beam: expected 0 (exact full ranking) or a beam width 1..512, "
                              f"got {self.eval_beam}")
        if self.eval_beam and self.eval_beam < max(self.eval_topk):
            raise ConfigError(f"recsys.eval_beam: {self.eval_beam} keeps fewer items than recsys.eval_topk's "
                              f"largest K ({max(self.eval_topk)})")
        self.sid.validate()


def _check_names(key: str, names: list[str], known: tuple[str, ...]) -> None:
    for i, name in enumerate(names):
        if name not in known:
            raise ConfigError(f"{key}[{i}]: unknown feature {name!r}; expected some of {list(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: a feature is listed twice in {names}")


register_section("recsys", RecsysConfig, optional=True, provides_data=True)
