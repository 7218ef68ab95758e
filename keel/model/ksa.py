"""KSA (Kwai Summary Attention): the backbone with learnable summary tokens every N text tokens.

A text token attends to its own chunk and the W previous chunks in full, and to older chunks only
through their S summary tokens, so the KV cache grows as O(n/N) beyond the window. The layout and mask
rule live in keel/kernels/ksa_layout.py (shared with the Triton kernel); this file is the model and
its config. The method, its equations and keel's choices: docs/ksa.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn

from keel.errors import CheckpointError, ConfigError
from keel.kernels.ksa_layout import (  # noqa: F401 (re-exported)
    expanded_layout,
    expanded_length,
    ksa_visible,
    summary_attention_mask,
    text_positions_in_expanded,
)
from keel.model.attention import AttentionMask
from keel.model.backbone import Attention, Transformer, TransformerBlock, TransformerConfig, apply_rope
from keel.model.ksa_attention import KSA_ATTENTION_IMPLS, KSAMask
from keel.model.ksa_cache import KSACache
from keel.model.ksa_distill import distillation_loss
from keel.model.ksa_hf import KSA_HF_ADAPTER
from keel.model.registry import ModelSpec, register_model
from keel.model.task import LanguageModelTask, decode_text

# Shared modules that may get a private summary copy (`summary_private`). The paper's released
# configuration shares all of them (q/k/v always have summary copies).
PRIVATE_CHOICES = ("attention_norm", "q_norm", "k_norm", "wo", "ffn_norm", "feed_forward")
LAYER_KINDS = ("ksa", "full")


@dataclass
class KSAConfig(TransformerConfig):
    name: str = "ksa"
    chunk_size: int = 8  # N text tokens per chunk
    summary_tokens: int = 1  # S summary tokens after each chunk
    window_chunks: int = 128  # W previous chunks whose text a text token sees in full
    # Layer kinds, tiled over the layers: "ksa", or "full" = hybrid form 1 (docs/ksa.md#hybrid-layers:
    # text-only causal attention; summaries bypass the layer unchanged). Default 3:1 as the paper's
    # Hybrid-KSA.
    layer_pattern: list[str] = field(default_factory=lambda: ["ksa", "ksa", "ksa", "full"])
    # Per-KSA-layer windows, tiled over the layers (hybrid form 2, docs/ksa.md#hybrid-layers; e.g.
    # [128, 128, 128, 1024] with layer_pattern [ksa]); empty = window_chunks everywhere. A large-window
    # layer keeps its window and old summaries at decode too (the reference's HF cache turns it into
    # full attention instead).
    layer_windows: list[int] = field(default_factory=list)
    skip_old_summary: bool = False  # True: sliding-chunk attention without summaries (Hybrid-SCA baseline)
    ksa_attention: str = "dense"  # dense | flex | triton (KSA_ATTENTION_IMPLS)
    summary_private: list[str] = field(default_factory=list)  # subset of PRIVATE_CHOICES
    # distill: only summary parameters train, on CE + KL + attention-output MSE against the same model
    # run without summaries (CPT stage 1); anneal (CPT stages 2-3) and full (from scratch): every
    # parameter trains on plain CE.
    ksa_stage: Literal["distill", "anneal", "full"] = "full"
    distill_ce_weight: float = 1.0  # distill stage: weight of the cross-entropy term
    distill_kl_weight: float = 5.0  # distill stage: weight of KL(teacher || student) over the vocabulary
    distill_mse_weight: float = 5.0  # distill stage: weight of the attention-output MSE
    distill_mse_clamp: float = 0.1  # distill stage: the MSE term is clamped to at most this
    # The official code can RMS-normalise attention outputs before the MSE (its default: off). keel
    # normalises by default, which makes the 0.1 clamp mean the same thing at every model width
    # (docs/ksa.md#choices-where-the-paper-is-silent).
    distill_mse_rms_norm: bool = True

    def validate(self) -> None:
        super().validate()
        for key in ("chunk_size", "summary_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.window_chunks < 0 or any(w < 0 for w in self.layer_windows):
            raise ConfigError(f"model.window_chunks/layer_windows: must be >= 0, got "
                              f"{self.window_chunks} / {self.layer_windows}")
        if not self.layer_pattern or any(k not in LAYER_KINDS for k in self.layer_pattern):
            raise ConfigError(f"model.layer_pattern: expected a non-empty list of {LAYER_KINDS}, "
                              f"got {self.layer_pattern}")
        if self.ksa_attention not in KSA_ATTENTION_IMPLS:
            raise ConfigError(f"model.ksa_attention: unknown {self.ksa_attention!r}; "
                              f"expected one of {sorted(KSA_ATTENTION_IMPLS)}")
        bad = [m for m in self.summary_private if m not in PRIVATE_CHOICES]
        if bad:
            raise ConfigError(f"model.summary_private: unknown {bad}; expected a subset of {PRIVATE_CHOICES}")
        if any(m in self.summary_private for m in ("q_norm", "k_norm")) and not self.qk_norm:
            raise ConfigError("model.summary_private: q_norm/k_norm need model.qk_norm: true")
        for key in ("distill_ce_weight", "distill_kl_weight", "distill_mse_weight", "distill_mse_clamp"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}: must be >= 0, got {getattr(self, key)}")

    def layer_kind(self, i: int) -> str:
        return self.layer_pattern[i % len(self.layer_pattern)]

    def layer_window(self, i: int) -> int:
        return self.layer_windows[i % len(self.layer_windows)] if self.layer_windows else self.window_chunks


def is_summary_param(name: str) -> bool:
    """The parameters distillation trains (the reference's rule: `summary_embedding` or `_summary`)."""
    return "summary_embedding" in name or "_summary" in name


@dataclass
class Layout:
    """Where text and summary slots sit in a forward's [B, E] sequence."""
    text_cols: torch.Tensor  # [T] text columns, in text order
    summary_cols: torch.Tensor  # [E - T]
    order: Optional[torch.Tensor]  # cat(text, summary) -> physical order; None when already physical
    ksa_mask: Optional[KSAMask] = None  # training / no-cache forward
    text_mask: Optional[AttentionMask] = None  # full layers, training / no-cache forward


def split_apply(x, layout: Layout, text_fn, summary_fn):
    """text_fn on text slots, summary_fn on summary slots (along dim 1); one call when shared."""
    if summary_fn is None or layout.summary_cols.numel() == 0:
        return text_fn(x)
    out = torch.cat([text_fn(x[:, layout.text_cols]), summary_fn(x[:, layout.summary_cols])], 1)
    return out if layout.order is None else out[:, layout.order]


def _private_copy(cfg: KSAConfig, name: str, module: Optional[nn.Module]):
    return copy_module(module) if module is not None and name in cfg.summary_private else None


def copy_module(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


class KSAAttention(Attention):
    def __init__(self, cfg: KSAConfig, window_chunks: int):
        super().__init__(cfg)  # the base projections: text tokens, and the summary-free teacher
        self.window_chunks = window_chunks
        self.wq_summary = copy_module(self.wq)
        self.wk_summary = copy_module(self.wk)
        self.wv_summary = copy_module(self.wv)
        self.wo_summary = _private_copy(cfg, "wo", self.wo)
        self.q_norm_summary = _private_copy(cfg, "q_norm", self.q_norm)
        self.k_norm_summary = _private_copy(cfg, "k_norm", self.k_norm)
        self.ksa_core = KSA_ATTENTION_IMPLS[cfg.ksa_attention]

    def forward(self, x, cos, sin, layout: Layout, cache=None):
        batch, seq, _ = x.shape
        q = split_apply(x, layout, self.wq, self.wq_summary).view(batch, seq, -1, self.head_dim)
        k = split_apply(x, layout, self.wk, self.wk_summary).view(batch, seq, -1, self.head_dim)
        v = split_apply(x, layout, self.wv, self.wv_summary).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q = split_apply(q, layout, self.q_norm, self.q_norm_summary)
            k = split_apply(k, layout, self.k_norm, self.k_norm_summary)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is None:
            out = self.ksa_core(q, k, v, layout.ksa_mask, self.window_chunks)
        else:
            out = cache.attend(q, k, v)
        return split_apply(out.transpose(1, 2).reshape(batch, seq, -1), layout, self.wo, self.wo_summary)


def dense_block_forward(block: TransformerBlock, x, cos, sin, mask: AttentionMask, cache=None, collect=None):
    """A block as plain causal attention on text with its base parameters (full layers; the teacher)."""
    attn = Attention.forward(block.attention, block.attention_norm(x), cos, sin, mask, cache)
    if collect is not None:
        collect.append(attn)
    x = x + attn
    return x + block.feed_forward(block.ffn_norm(x))


class KSABlock(TransformerBlock):
    is_ksa = True

    def __init__(self, cfg: KSAConfig, window_chunks: int):
        super().__init__(cfg)
        self.attention = KSAAttention(cfg, window_chunks)
        self.attention_norm_summary = _private_copy(cfg, "attention_norm", self.attention_norm)
        self.ffn_norm_summary = _private_copy(cfg, "ffn_norm", self.ffn_norm)
        self.feed_forward_summary = _private_copy(cfg, "feed_forward", self.feed_forward)

    def forward(self, x, cos, sin, layout: Layout, cache=None, collect=None):
        attn = self.attention(split_apply(x, layout, self.attention_norm, self.attention_norm_summary),
                              cos, sin, layout, cache)
        if collect is not None:
            collect.append(attn[:, layout.text_cols])
        x = x + attn
        h = split_apply(x, layout, self.ffn_norm, self.ffn_norm_summary)
        return x + split_apply(h, layout, self.feed_forward, self.feed_forward_summary)


class FullBlock(TransformerBlock):
    """Hybrid form 1: causal attention + MLP on the text slots only; summaries pass through unchanged."""
    is_ksa = False

    def forward(self, x, cos, sin, layout: Layout, cache=None, collect=None):
        cols = layout.text_cols
        text = dense_block_forward(self, x[:, cols], cos[:, cols], sin[:, cols], layout.text_mask, cache, collect)
        return x.index_copy(1, cols, text)


class KSATransformer(Transformer):
    """The backbone with S summary tokens after every N text tokens (docs/ksa.md).

    Callers see text only: input_ids/positions/doc_ids/labels are [B, T] text tensors and logits come
    back for text positions; summaries are inserted after the embedding and removed before the LM head,
    so no loss ever falls on them.
    """

    def __init__(self, cfg: KSAConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleDict({
            str(i): KSABlock(cfg, cfg.layer_window(i)) if cfg.layer_kind(i) == "ksa" else FullBlock(cfg)
            for i in range(cfg.n_layers)})
        self.summary_embedding = nn.Embedding(cfg.summary_tokens, cfg.dim)
        if cfg.ksa_stage == "distill":  # keel/train/optim.py skips parameters that do not require grad
            for name, param in self.named_parameters():
                param.requires_grad_(is_summary_param(name))

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()  # base modules; summary copies are then taken from them
        self.init_summary_weights()

    @torch.no_grad()
    def init_summary_weights(self, names: Optional[set] = None) -> None:
        """Summary parameters from the base ones (all, or just `names`), as when converting a dense model:
        each summary q/k/v (and private norm/wo/MLP copy) starts equal to its base module, so a summary
        token is first processed like a text token. The summary embedding rows start at the mean token
        embedding plus Gaussian noise of the embedding's entry std: a typical token's scale, and distinct
        rows (identical rows would share positions, inputs and gradients forever)."""
        for name, param in self.named_parameters():
            if not is_summary_param(name) or (names is not None and name not in names):
                continue
            if name == "summary_embedding.weight":
                table = self.tok_embeddings.weight.float()
                noise = torch.randn(param.shape, device=param.device) * table.std()
                param.copy_(table.mean(0, keepdim=True) + noise)
            else:
                param.copy_(self.get_parameter(name.replace("_summary", "")))

    def init_missing_weights(self, missing: set) -> None:
        """Hook for checkpoint.load_model_weights: a dense checkpoint (`model.init_from`) lacks the
        summary parameters; initialise those from the loaded dense ones, refuse anything else."""
        other = sorted(k for k in missing if not is_summary_param(k))
        if other:
            raise CheckpointError(f"checkpoint lacks non-summary weights of this KSA model: {other[:5]}")
        self.init_summary_weights(set(missing))

    # ------------------------------------------------------------ layout
    def _expand(self, input_ids, positions, doc_ids) -> tuple:
        """Embeddings, positions and layout of the expanded sequence of a no-cache forward."""
        cfg = self.config
        batch, text_len = input_ids.shape
        device = input_ids.device
        text_index, is_summary = expanded_layout(text_len, cfg.chunk_size, cfg.summary_tokens, device)
        text_cols = text_positions_in_expanded(text_len, cfg.chunk_size, cfg.summary_tokens, device)
        summary_cols = is_summary.nonzero().squeeze(1)
        order = torch.argsort(torch.cat([text_cols, summary_cols]))
        summary_ids = (summary_cols % (cfg.chunk_size + cfg.summary_tokens)) - cfg.chunk_size
        h = torch.cat([self.embed(input_ids),
                       self.summary_embedding(summary_ids)[None].expand(batch, -1, -1)], 1)[:, order]
        if positions is None:
            positions = torch.arange(text_len, device=device).expand(batch, text_len)
        doc_exp = None if doc_ids is None else doc_ids[:, text_index]
        layout = Layout(text_cols, summary_cols, order,
                        KSAMask(cfg.chunk_size, cfg.summary_tokens, cfg.skip_old_summary, doc_exp),
                        AttentionMask(causal=True, doc_ids=doc_ids))
        return h, positions[:, text_index], layout

    def _expand_step(self, input_ids, cache) -> tuple:
        """The same for one cached step: [B, T text columns | K*S summary columns]."""
        step = cache.begin_step(input_ids.shape[1])
        text_len, device = input_ids.shape[1], input_ids.device
        width = step.g.shape[1]
        h = torch.cat([self.embed(input_ids), self.summary_embedding(step.summary_ids)], 1)
        layout = Layout(torch.arange(text_len, device=device), torch.arange(text_len, width, device=device),
                        None, text_mask=cache.full_mask(text_len))
        return h, step.positions, layout

    # ------------------------------------------------------------ forward
    def run_layers(self, input_ids, positions=None, doc_ids=None, cache=None, collect=None):
        """Final-normed hidden states [B, T, dim] at text positions (summaries dropped)."""
        if cache is None:
            h, exp_positions, layout = self._expand(input_ids, positions, doc_ids)
        else:
            h, exp_positions, layout = self._expand_step(input_ids, cache)
        cos, sin = self.rope(exp_positions)
        for i, block in enumerate(self.layers.values()):
            h = block(h, cos, sin, layout, None if cache is None else cache.layer(i), collect)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(h[:, layout.text_cols])

    def hidden_states(self, input_ids, positions=None, doc_ids=None, cache=None) -> torch.Tensor:
        return self.run_layers(input_ids, positions, doc_ids, cache)

    def dense_hidden_states(self, input_ids, positions=None, doc_ids=None, collect=None) -> torch.Tensor:
        """The same model without summary tokens: every layer plain causal attention with its base
        parameters (the stage-1 distillation teacher, and the dense model a CPT starts from)."""
        batch, seq = input_ids.shape
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        cos, sin = self.rope(positions)
        mask = AttentionMask(causal=True, doc_ids=doc_ids)
        h = self.embed(input_ids)
        for block in self.layers.values():
            h = dense_block_forward(block, h, cos, sin, mask, collect=collect)
        return self.norm(h)

    def forward(self, input_ids, labels=None, positions=None, doc_ids=None, cache=None):
        if labels is None or cache is not None or not self.training or self.config.ksa_stage != "distill":
            return super().forward(input_ids, labels, positions, doc_ids, cache)
        with torch.no_grad():
            teacher_attn: list = []
            teacher = self.dense_hidden_states(input_ids, positions, doc_ids, teacher_attn)
        student_attn: list = []
        student = self.run_layers(input_ids, positions, doc_ids, collect=student_attn)
        return distillation_loss(student, teacher, self.head_weight(), labels, student_attn, teacher_attn,
                                 self.config)

    def new_kv_cache(self, batch: int, max_len: int):
        return KSACache(self, batch, max_len)


def ksa_from_dense(dense, cfg: KSAConfig) -> KSATransformer:
    """A KSA model holding a dense keel model's weights (a module or its state dict, e.g. SmolLM2
    imported by keel.model.hf), with the summary parameters initialised from them (init_summary_weights)."""
    cfg.validate()
    state = dense.state_dict() if isinstance(dense, nn.Module) else dense
    model = KSATransformer(cfg)
    model.init_weights()  # buffers, and a defined value everywhere before the dense weights land
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"dense weights do not fit this KSA config: {str(e).splitlines()[-1][:200]}") from None
    if unexpected:
        raise CheckpointError(f"dense weights have keys this KSA model lacks: {sorted(unexpected)[:5]}")
    model.init_missing_weights(set(missing))
    return model


# KSA's summary projections need their own TP styles, its expanded sequence its own CP split and
# PP stages: data parallelism only for now (refused with a clear error otherwise).
register_model(ModelSpec("ksa", KSAConfig, KSATransformer, LanguageModelTask,
                         "Kwai Summary Attention: summary tokens every N text tokens (docs/ksa.md)",
                         model_parallel=(), decode=decode_text, hf=KSA_HF_ADAPTER))
