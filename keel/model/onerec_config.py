"""OneRec-V2's model config (arXiv 2508.20900 §3.3): shapes, the lazy KV layout and the data-derived sizes.

Kept apart from keel/model/onerec.py so the config (and its parameter count, used by `keel plan`
and the FLOPs tables) reads without the modules. Sizes marked "filled by the task" are 0/empty in
a recipe and set from the data (SID table, user features) before the model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from keel.errors import ConfigError
from keel.model.backbone import TransformerConfig
from keel.model.moe import MoEConfig, moe_flops_params

ARCHITECTURES = ("lazy_decoder", "encoder_decoder", "naive_decoder")
CONTEXT_FEATURES = ("item", "sid", "rating", "gap")  # per context item, as the batch carries them


@dataclass
class OneRecConfig:
    name: str = "onerec"  # the family
    architecture: Literal["lazy_decoder", "encoder_decoder", "naive_decoder"] = "lazy_decoder"  # §3.3 Table 2
    dim: int = 128  # d_model of the decoder blocks
    n_layers: int = 4  # decoder blocks (N_layer)
    n_heads: int = 4  # query heads; d_head = dim / n_heads
    ffn_dim: int = 0  # SwiGLU hidden width; 0: 4 * dim (18 d^2 per lazy block: reproduces Table 5's 0.1B..8B sizes)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # normal init std (residual output projections scaled by depth, as the backbone)
    d_feature: int = 32  # width of each sparse feature embedding (Table 5's embed_dim, read as this; the paper does not say)
    context_hidden: int = 0  # hidden width of the context processor's Dense-LeakyReLU-Dense MLPs; 0: dim
    s_kv: int = 1  # S_kv: 1 = v shares k's slice, 2 = separate k and v slices per KV layer
    l_kv: int = 1  # L_kv: KV sets; block l reads set floor(l * L_kv / N_layer)
    g_kv: int = 0  # G_kv: KV heads of the lazy cross-attention (GQA); 0: n_heads
    context_len: int = 50  # most recent context items (the recency embedding's rows)
    context_positions: bool = True  # add a learned recency embedding per context slot (order beyond gap buckets)
    encoder_layers: int = 0  # encoder_decoder only: bidirectional encoder blocks; 0: n_layers (Enc:Dec 1:1)
    moe: Optional[MoEConfig] = None  # MoE FFN (OneRec-V2: first_dense_layers 2); None: dense
    # ---- data-derived, filled by the task before build
    n_items: int = 0  # items 1..n_items (0 = padding)
    n_users: int = 0  # users 1..n_users (informational; the user id embeds through user_features)
    sid_levels: list[int] = field(default_factory=list)  # codebook size per SID level (L = len)
    user_features: list[str] = field(default_factory=lambda: ["user", "age", "gender", "occupation"])  # profile features (one context token)
    user_feature_sizes: list[int] = field(default_factory=list)  # vocabulary per user feature (0 = unknown included)
    n_ratings: int = 6  # rating vocabulary (0 = pad, 1..5)
    n_gaps: int = 16  # time-gap bucket vocabulary (0 = pad)
    context_features: list[str] = field(default_factory=lambda: list(CONTEXT_FEATURES))  # per context item

    def __post_init__(self):
        self.ffn_dim = self.ffn_dim or 4 * self.dim
        self.g_kv = self.g_kv or self.n_heads
        self.context_hidden = self.context_hidden or self.dim
        self.encoder_layers = self.encoder_layers or self.n_layers

    # ------------------------------------------------------------ derived shapes
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def d_context(self) -> int:
        """Width of one processed context token: S_kv * L_kv * G_kv * d_head (lazy), else dim."""
        if self.architecture == "lazy_decoder":
            return self.s_kv * self.l_kv * self.g_kv * self.head_dim
        return self.dim

    def kv_set(self, layer: int) -> int:
        """The KV set block `layer` reads: l_kv = floor(l * L_kv / N_layer) (consecutive blocks share)."""
        return layer * self.l_kv // self.n_layers

    def item_feature_width(self) -> int:
        names = self.context_features
        n = sum(1 for f in ("item", "rating", "gap") if f in names) + (len(self.sid_levels) if "sid" in names else 0)
        return self.d_feature * (n + (1 if self.context_positions else 0))

    def user_feature_width(self) -> int:
        return self.d_feature * (1 + len(self.user_features))  # +1: a constant "profile" row, so the token always exists

    def backbone_config(self) -> TransformerConfig:
        """The backbone's view of one decoder block (self-attention, FFN/MoE, RoPE)."""
        return TransformerConfig(name=self.name, vocab_size=1, dim=self.dim, n_layers=self.n_layers,
                                 n_heads=self.n_heads, ffn_dim=self.ffn_dim, norm_eps=self.norm_eps,
                                 init_std=self.init_std, max_seq_len=self.context_len + len(self.sid_levels) + 2,
                                 moe=self.moe)

    # ------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture: unknown {self.architecture!r}; expected one of {list(ARCHITECTURES)}")
        for key in ("dim", "n_layers", "n_heads", "d_feature", "context_len", "l_kv", "g_kv", "encoder_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ConfigError(f"model.n_heads: {self.n_heads} must divide model.dim {self.dim} into even head widths")
        if self.s_kv not in (1, 2):
            raise ConfigError(f"model.s_kv: must be 1 or 2, got {self.s_kv}")
        if self.l_kv > self.n_layers:
            raise ConfigError(f"model.l_kv: {self.l_kv} exceeds model.n_layers {self.n_layers}")
        if self.n_heads % self.g_kv:
            raise ConfigError(f"model.g_kv: {self.g_kv} does not divide model.n_heads {self.n_heads}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps}")
        bad = [f for f in self.context_features if f not in CONTEXT_FEATURES]
        if bad:
            raise ConfigError(f"model.context_features: unknown {bad}; expected names from {list(CONTEXT_FEATURES)}")
        if any(v <= 0 for v in self.sid_levels):
            raise ConfigError(f"model.sid_levels: every codebook size must be > 0, got {self.sid_levels}")
        if self.user_feature_sizes and len(self.user_feature_sizes) != len(self.user_features):
            raise ConfigError(f"model.user_feature_sizes: {len(self.user_feature_sizes)} sizes for "
                              f"{len(self.user_features)} model.user_features")
        if self.moe is not None:
            self.moe.validate(self.n_layers)

    def check_data_sizes(self) -> None:
        """Before build: the sizes the task fills from the data must be there."""
        if self.n_items <= 0:
            raise ConfigError("model.n_items: not set (the task fills it from the data before build)")
        if not self.sid_levels:
            raise ConfigError("model.sid_levels: not set (the task fills it from the SID table before build)")
        if len(self.user_feature_sizes) != len(self.user_features):
            raise ConfigError(f"model.user_feature_sizes: {len(self.user_feature_sizes)} sizes for "
                              f"{len(self.user_features)} model.user_features (filled by the task)")
        self.validate()

    # ------------------------------------------------------------ size
    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters; `active`: only those one token uses (top-k + shared experts of MoE layers).
        `embeddings`: include the sparse feature tables and the SID token table."""
        d, hd, L = self.dim, self.n_heads * self.head_dim, len(self.sid_levels)
        out, hid = self.d_context, self.context_hidden
        mlp = lambda n_in: n_in * hid + hid + hid * out + out  # noqa: E731  Dense-LeakyReLU-Dense with biases
        total = mlp(self.item_feature_width()) + mlp(self.user_feature_width())
        if self.architecture == "lazy_decoder":
            total += self.l_kv * self.s_kv * self.g_kv * self.head_dim  # RMSNorm_k (and RMSNorm_v) per KV layer
        block = 4 * d * hd + 2 * d  # self-attention + its and the FFN's norms
        if self.architecture == "lazy_decoder":
            block += 2 * d * hd + d  # q and o only: no K/V projections
        elif self.architecture == "encoder_decoder":
            block += 2 * d * hd + 2 * d * self.g_kv * self.head_dim + d
        dense_ffn = 3 * d * self.ffn_dim
        total += self.n_layers * (block + dense_ffn)
        if self.moe is not None:
            moe_total, moe_active = moe_flops_params(d, self.ffn_dim, self.moe)
            total += self.moe.moe_layer_count(self.n_layers) * ((moe_active if active else moe_total) - dense_ffn)
        if self.architecture == "encoder_decoder":
            total += self.encoder_layers * (4 * d * hd + 2 * d + dense_ffn) + d
        total += sum(d + d * v for v in self.sid_levels)  # position-specific RMSNorm + Linear heads
        if embeddings:
            feats = self.context_features
            rows = (self.n_items + 1 if "item" in feats else 0) + (sum(self.sid_levels) if "sid" in feats else 0)
            rows += (self.n_ratings if "rating" in feats else 0) + (self.n_gaps if "gap" in feats else 0)
            rows += (self.context_len if self.context_positions else 0) + 1 + sum(self.user_feature_sizes)
            total += rows * self.d_feature + (1 + sum(self.sid_levels[:L - 1])) * d
        return total
