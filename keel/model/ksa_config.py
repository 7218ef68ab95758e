"""The config of the KSA family (`model:` keys; docs/ksa.md). Where keel offers a choice the reference
code makes differently, the reference's behaviour is the default unless noted (issue 17)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from keel.config import register_check
from keel.errors import ConfigError
from keel.model.backbone import TransformerConfig
from keel.model.ksa_attention import KSA_ATTENTION_IMPLS

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
    # layer keeps its window and old summaries at decode too unless decode_large_window_as_full.
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
    # RMS-normalise attention outputs before the MSE (x / (rms + 1e-6), the official
    # `summary_distill_attention_norm`); default off, as the official code.
    distill_mse_rms_norm: bool = False
    # How summary parameters start (a fresh model, or those a dense checkpoint lacks at CPT):
    # reference = the official code: summary q/k/v xavier-uniform (bias 0), summary embedding N(0, 0.02),
    #   private norms ones, private wo/MLP copies (keel only) copies of the base modules;
    # copy = summary q/k/v and private copies start equal to the base modules, embedding rows at the
    #   mean token embedding + Gaussian noise of the table's std (a summary starts as a typical token).
    summary_init: Literal["reference", "copy"] = "reference"
    # The official `summary_mix_qkv` (CPT from a dense model): at summary positions q/k/v (after qk-norm,
    # before RoPE) = mix * summary projection + (1 - mix) * base projection, mix going linearly from 1 at
    # trainer step <= summary_mix_start_step to 0 at step >= max(start + 1, summary_mix_end_step).
    # Steps are the trainer's (1-based, counted within this run). Default off (the official default).
    summary_mix_qkv: bool = False
    summary_mix_start_step: int = 0  # summary_mix_qkv: the last step with mix 1 (summary projections alone)
    summary_mix_end_step: int = 0  # summary_mix_qkv: the first step with mix 0 (base projections alone)
    # Decode only: a KSA layer whose window exceeds the smallest KSA window (hybrid form 2's 1024-chunk
    # layers) attends to all past text at decode, as the official HF cache does (Qwen3RingBufferCache
    # `is_large_window`). Default false: decode keeps the window + old summaries, exactly as training.
    decode_large_window_as_full: bool = False
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
        if self.summary_init not in ("reference", "copy"):
            raise ConfigError(f"model.summary_init: expected reference or copy, got {self.summary_init!r}")
        if self.summary_mix_start_step < 0 or self.summary_mix_end_step < 0:
            raise ConfigError(f"model.summary_mix_start_step/end_step: must be >= 0, got "
                              f"{self.summary_mix_start_step} / {self.summary_mix_end_step}")
        for key in ("distill_ce_weight", "distill_kl_weight", "distill_mse_weight", "distill_mse_clamp"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}: must be >= 0, got {getattr(self, key)}")

    def layer_kind(self, i: int) -> str:
        return self.layer_pattern[i % len(self.layer_pattern)]

    def layer_window(self, i: int) -> int:
        return self.layer_windows[i % len(self.layer_windows)] if self.layer_windows else self.window_chunks




def summary_mix_coefficient(cfg: KSAConfig, step: int) -> float:
    """The official `_get_summary_mix_coeff`: the summary projections' weight at trainer step `step`."""
    if not cfg.summary_mix_qkv:
        return 1.0
    start = cfg.summary_mix_start_step
    end = max(start + 1, cfg.summary_mix_end_step)
    if step <= start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


@register_check
def check_ksa_tensor_parallel(cfg) -> None:
    """Measured, not understood yet: with QK-norm, tp2 distillation (only summary parameters train) gives
    gradients 0.5% off one process's, while pretraining (every parameter) and distillation without QK-norm
    match to fp32 rounding (tests/test_ksa_parallel.py's comparison, run by hand with the other stages).
    Refused until found, rather than trained wrong."""
    model = cfg.model
    if getattr(model, "name", None) == "ksa" and cfg.parallel.tp > 1 and model.qk_norm and model.ksa_stage == "distill":
        raise ConfigError("parallel.tp: KSA distillation (model.ksa_stage distill) with model.qk_norm does not "
                          "yet match one process under tensor parallelism; use data parallelism for this stage")
