"""Training FLOPs per sample of the recommenders, measured and by formula (§3.3 Table 2).

Measured: torch.utils.flop_counter.FlopCounterMode over one forward + backward of the built model,
divided by the batch's context rows (samples). On the meta device nothing is computed, so a 1B
model at context 512 is counted in seconds without memory. Formula: 2 FLOPs per multiply-add of
every matmul a token meets (forward), attention scores and values included; training = 3x forward.

A sample is one context row with its K targets (K = 1 in Table 2). The paper's Table 2 numbers
(lazy 18.9 vs naive 635 GFLOPs at 1B) match forward-only counts in size, so both are reported.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from keel.model.moe import moe_flops_params
from keel.model.onerec import OneRec
from keel.model.onerec_config import ARCHITECTURES, OneRecConfig

# §3.3 Table 5: size -> (d_model, layers, heads, embed_dim)
TABLE5_SHAPES = {
    "0.1B": (640, 12, 10, 32), "0.2B": (896, 12, 14, 45), "0.5B": (1408, 14, 11, 70), "1B": (1792, 18, 14, 90),
    "2B": (2304, 22, 18, 115), "4B": (2944, 26, 23, 147), "8B": (3584, 34, 28, 179),
}


def _samples(batch) -> int:
    return batch["targets"].shape[0]


@contextlib.contextmanager
def _counting():
    """Count with SDPA's math path: its bmm's are counted everywhere, while the fused CPU kernel
    (_scaled_dot_product_flash_attention_for_cpu) has no FLOP formula and would count as zero."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        yield counter


def training_flops_per_sample(model: torch.nn.Module, batch) -> float:
    """FLOPs of forward + backward of `model(batch)` per sample (context row), as torch counts them."""
    with _counting() as counter:
        model(batch).backward()
    return counter.get_total_flops() / _samples(batch)


def forward_flops_per_sample(model: torch.nn.Module, batch) -> float:
    with torch.no_grad(), _counting() as counter:
        model(batch)
    return counter.get_total_flops() / _samples(batch)


def random_batch(cfg: OneRecConfig, batch_size: int, context_len: int, n_targets: int = 1, device="cpu") -> dict:
    """A batch with a full context (no padding) of the spec's layout; values are random ids."""
    dev = torch.device(device)
    shape = (batch_size, context_len)
    ints = lambda high, size: torch.randint(1, max(high, 2), size, device=dev)  # noqa: E731
    sids = lambda lead: torch.stack([torch.randint(0, v, lead, device=dev) for v in cfg.sid_levels], -1)  # noqa: E731
    user_feats = [torch.randint(0, max(v, 1), (batch_size,), device=dev) for v in cfg.user_feature_sizes]
    return {
        "user": ints(cfg.n_users + 1, (batch_size,)),
        "user_feats": (torch.stack(user_feats, 1) if user_feats
                       else torch.zeros(batch_size, 0, dtype=torch.long, device=dev)),
        "ctx_items": ints(cfg.n_items + 1, shape), "ctx_ratings": ints(cfg.n_ratings, shape),
        "ctx_gaps": ints(cfg.n_gaps, shape), "targets": ints(cfg.n_items + 1, (batch_size, n_targets)),
        "ctx_sids": sids(shape), "target_sids": sids((batch_size, n_targets)),
    }


def formula_flops_per_sample(cfg: OneRecConfig, context_len: int, n_targets: int = 1, training: bool = True) -> int:
    """The matmul count of one sample (one context row, `n_targets` targets) by formula."""
    d, hd, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.g_kv * cfg.head_dim
    levels, n_ctx = cfg.sid_levels, context_len + 1  # + the user-profile token
    q_len = len(levels)
    hid, width = cfg.context_hidden, cfg.d_context
    flops = 2 * context_len * (cfg.item_feature_width() * hid + hid * width)
    flops += 2 * (cfg.user_feature_width() * hid + hid * width)

    def ffn(layer: int) -> int:
        if cfg.moe is not None and cfg.moe.is_moe_layer(layer):
            return 2 * moe_flops_params(d, cfg.ffn_dim, cfg.moe)[1]
        return 2 * 3 * d * cfg.ffn_dim

    def self_block(layer: int, tokens: int, keys: int) -> int:  # qkvo + scores/values + FFN, per token
        return tokens * (2 * 4 * d * hd + 2 * 2 * keys * hd + ffn(layer))

    for layer in range(cfg.n_layers):
        if cfg.architecture == "naive_decoder":
            flops += n_targets * self_block(layer, n_ctx + q_len, n_ctx + q_len)
            continue
        flops += n_targets * self_block(layer, q_len, q_len)
        flops += n_targets * q_len * (2 * 2 * d * hd + 2 * 2 * n_ctx * hd)  # cross q, o and attention
        if cfg.architecture == "encoder_decoder":
            flops += 2 * 2 * n_ctx * d * kv  # K/V projections of the encoder output
    if cfg.architecture == "encoder_decoder":
        flops += cfg.encoder_layers * n_ctx * (2 * 4 * d * hd + 2 * 2 * n_ctx * hd + 2 * 3 * d * cfg.ffn_dim)
    flops += n_targets * sum(2 * d * v for v in levels)  # position-specific heads
    return 3 * flops if training else flops


def table5_config(size: str = "1B", architecture: str = "lazy_decoder", **overrides) -> OneRecConfig:
    """A Table 5 shape with ML-100K-sized data fields (3 x 256 SIDs), for counting."""
    dim, layers, heads, embed = TABLE5_SHAPES[size]
    fields = dict(architecture=architecture, dim=dim, n_layers=layers, n_heads=heads, d_feature=embed,
                  context_len=512, n_items=1682, n_users=943, sid_levels=[256, 256, 256],
                  user_features=["user", "age", "gender", "occupation"], user_feature_sizes=[944, 8, 3, 22])
    fields.update(overrides)
    return OneRecConfig(**fields)


def compare_architectures(size: str = "1B", context_len: int = 512, batch_size: int = 2, device="meta",
                          **overrides) -> dict:
    """Per architecture: measured training and forward FLOPs per sample and the formula's, at one shape
    (§3.3 Table 2). On the meta device the models are built and run without memory or compute."""
    out = {}
    for arch in ARCHITECTURES:
        cfg = table5_config(size, arch, context_len=context_len, **overrides)
        if arch == "encoder_decoder":  # Table 2's "Enc:Dec 1:1" splits the same depth, not doubles it
            cfg.encoder_layers = cfg.n_layers - cfg.n_layers // 2
            cfg.n_layers //= 2
            cfg.l_kv = min(cfg.l_kv, cfg.n_layers)
        with torch.device(device):
            model = OneRec(cfg)
        if device != "meta":
            model.init_weights()
        batch = random_batch(cfg, batch_size, context_len, device=device)
        out[arch] = {"train": training_flops_per_sample(model, batch),
                     "forward": forward_flops_per_sample(model, batch),
                     "formula_train": formula_flops_per_sample(cfg, context_len),
                     "params": cfg.num_params()}
    return out
