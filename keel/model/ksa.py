"""KSA (Kwai Summary Attention): the backbone with learnable summary tokens every N text tokens.

A text token attends to its own chunk and the W previous chunks in full, and to older chunks only
through their S summary tokens, so the KV cache grows as O(n/N) beyond the window. The layout and mask
rule live in keel/kernels/ksa_layout.py (shared with the Triton kernel); this file is the model and
its training task (the config: keel/model/ksa_config.py). The method, its equations and keel's
choices: docs/ksa.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from keel.errors import CheckpointError
from keel.kernels.ksa_layout import (  # noqa: F401 (re-exported)
    expanded_layout,
    expanded_length,
    ksa_visible,
    summary_attention_mask,
    text_positions_in_expanded,
)
from keel.model.attention import AttentionMask
from keel.model.backbone import Attention, Transformer, TransformerBlock, apply_rope
from keel.model.ksa_attention import KSA_ATTENTION_IMPLS, KSAMask
from keel.model.ksa_cache import KSACache
from keel.model.ksa_config import (  # noqa: F401 (re-exported)
    LAYER_KINDS,
    PRIVATE_CHOICES,
    KSAConfig,
    summary_mix_coefficient,
)
from keel.model.ksa_distill import distillation_loss
from keel.model.ksa_hf import KSA_HF_ADAPTER
from keel.model.registry import TRANSFORMER_TP_PLAN, ModelSpec, TensorParallelPlan, register_model
from keel.model.task import LanguageModelTask, decode_text


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
    summary_mix: Optional[torch.Tensor] = None  # summary_mix_qkv: the summary projections' weight (0-dim)


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

    def _project(self, x, layout: Layout, name: str):
        """q, k or v [B, E, heads, head_dim]: the base module (+ its qk-norm) at text positions, the summary
        one at summary positions; under summary_mix_qkv the latter is mix * summary + (1 - mix) * base,
        after the norm (the official code)."""
        proj, proj_summary = getattr(self, "w" + name), getattr(self, f"w{name}_summary")
        norm = getattr(self, f"{name}_norm", None)
        norm_summary = getattr(self, f"{name}_norm_summary", None)
        norm_summary = norm if norm_summary is None else norm_summary

        def run(p, n, t):
            t = p(t).view(*t.shape[:2], -1, self.head_dim)
            return t if n is None else n(t)

        def base(t):
            return run(proj, norm, t)

        def summary(t):
            out = run(proj_summary, norm_summary, t)
            if layout.summary_mix is None:
                return out
            mix = layout.summary_mix.to(out.dtype)
            return mix * out + (1 - mix) * base(t)

        return split_apply(x, layout, base, summary)

    def forward(self, x, cos, sin, layout: Layout, cache=None):
        batch, seq, _ = x.shape
        q, k, v = (self._project(x, layout, name) for name in ("q", "k", "v"))
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
        # No distillation output: only KSA layers enter the MSE (the official code).
        text = dense_block_forward(self, x[:, cols], cos[:, cols], sin[:, cols], layout.text_mask, cache)
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
        # summary_mix_qkv's current coefficient (set per step by KSALanguageModelTask: set_train_step).
        self.register_buffer("summary_mix", torch.ones(()), persistent=False)
        if cfg.ksa_stage == "distill":  # keel/train/optim.py skips parameters that do not require grad
            for name, param in self.named_parameters():
                param.requires_grad_(is_summary_param(name))

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_buffers(self) -> None:
        super().init_buffers()
        self.summary_mix.fill_(1.0)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()  # base modules; `copy` summary init then takes copies of them
        self.init_summary_weights()

    @torch.no_grad()
    def init_summary_weights(self, names: Optional[set] = None) -> None:
        """Summary parameters (all, or just `names`) by `model.summary_init` (docs/ksa.md#summary-parameters).

        reference (the official code): summary q/k/v weights xavier-uniform, their biases 0, the summary
        embedding N(0, 0.02), private q/k-norm or attention/FFN norm copies ones; a private wo/MLP copy
        (keel only) starts as a copy of its base module.
        copy: every summary module starts equal to its base module, so a summary token is first processed
        like a text token; summary embedding rows start at the mean token embedding plus Gaussian noise of
        the table's entry std (distinct rows: identical rows would share inputs and gradients forever)."""
        reference = self.config.summary_init == "reference"
        for name, param in self.named_parameters():
            if not is_summary_param(name) or (names is not None and name not in names):
                continue
            module = name.rsplit(".", 2)[-2]
            if name == "summary_embedding.weight":
                if reference:
                    nn.init.normal_(param, mean=0.0, std=0.02)
                else:
                    table = self.tok_embeddings.weight.float()
                    noise = torch.randn(param.shape, device=param.device) * table.std()
                    param.copy_(table.mean(0, keepdim=True) + noise)
            elif reference and module in ("wq_summary", "wk_summary", "wv_summary"):
                if name.endswith(".weight"):
                    nn.init.xavier_uniform_(param)
                else:
                    nn.init.zeros_(param)
            elif reference and "norm_summary" in name:
                nn.init.ones_(param)
            else:
                param.copy_(self.get_parameter(name.replace("_summary", "")))

    @torch.no_grad()
    def set_train_step(self, step: int) -> None:
        """The trainer step about to run (1-based): sets summary_mix_qkv's coefficient."""
        self.summary_mix.fill_(summary_mix_coefficient(self.config, step))

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
        # A summary belongs to its chunk's last text token's document (its RoPE position may sit earlier
        # in the chunk when S > 1: summary_offset).
        doc_index = torch.where(is_summary, (text_index // cfg.chunk_size + 1) * cfg.chunk_size - 1, text_index)
        doc_exp = None if doc_ids is None else doc_ids[:, doc_index]
        layout = Layout(text_cols, summary_cols, order,
                        KSAMask(cfg.chunk_size, cfg.summary_tokens, cfg.skip_old_summary, doc_exp),
                        AttentionMask(causal=True, doc_ids=doc_ids), self._summary_mix())
        return h, positions[:, text_index], layout

    def _summary_mix(self) -> Optional[torch.Tensor]:
        return self.summary_mix if self.config.summary_mix_qkv else None

    def _expand_step(self, input_ids, cache) -> tuple:
        """The same for one cached step: [B, T text columns | K*S summary columns]."""
        step = cache.begin_step(input_ids.shape[1])
        text_len, device = input_ids.shape[1], input_ids.device
        width = step.g.shape[1]
        h = torch.cat([self.embed(input_ids), self.summary_embedding(step.summary_ids)], 1)
        layout = Layout(torch.arange(text_len, device=device), torch.arange(text_len, width, device=device),
                        None, text_mask=cache.full_mask(text_len), summary_mix=self._summary_mix())
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
        for block in self.layers.values():  # collect: KSA layers only, matching the student's
            h = dense_block_forward(block, h, cos, sin, mask, collect=collect if block.is_ksa else None)
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


class KSALanguageModelTask(LanguageModelTask):
    """The next-token task, plus: before each loss the model learns which trainer step runs (1-based, from
    the data sampler's position, so it resumes), for `model.summary_mix_qkv`'s schedule."""
    data = None

    def build_data(self, *, dp_rank: int, dp_size: int):
        self.data = super().build_data(dp_rank=dp_rank, dp_size=dp_size)
        return self.data

    def current_step(self) -> int:
        sampler = getattr(self.data, "sampler", None)
        return 0 if sampler is None else sampler.consumed_samples // sampler.global_batch

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        if self.cfg.model.summary_mix_qkv:
            core = model
            while not hasattr(core, "set_train_step"):  # DeepSpeed engine / torch.compile wrappers
                core = getattr(core, "module", None) or core._orig_mod
            core.set_train_step(self.current_step())
        return super().loss_sum(model, batch)


# Tensor parallelism splits the summary projections (and the private summary copies a recipe keeps)
# like the base ones. Not yet: sequence parallelism (the summary slots are gathered by index along the
# sequence), CP (the expanded sequence needs its own split) and PP stages; refused with a clear error.
KSA_TP_PLAN = TensorParallelPlan(
    colwise=TRANSFORMER_TP_PLAN.colwise + ("attention.wq_summary", "attention.wk_summary", "attention.wv_summary",
                                           "feed_forward_summary.w1", "feed_forward_summary.w3"),
    rowwise=TRANSFORMER_TP_PLAN.rowwise + ("attention.wo_summary", "feed_forward_summary.w2"),
    head_norms=TRANSFORMER_TP_PLAN.head_norms + ("attention.q_norm_summary", "attention.k_norm_summary"),
    sequence_parallel=False,
)
register_model(ModelSpec("ksa", KSAConfig, KSATransformer, KSALanguageModelTask,
                         "Kwai Summary Attention: summary tokens every N text tokens (docs/ksa.md)",
                         tp_plan=KSA_TP_PLAN, model_parallel=("tp",), decode=decode_text, hf=KSA_HF_ADAPTER))
