"""KSA stage-1 self-distillation loss (docs/ksa.md#stage-1-distillation-loss), as a per-token SUM (the
Trainer divides by the global count of label tokens, like the plain next-token loss).

    L = ce_w * CE + kl_w * KL(teacher || student) + n * mse_w * mean_{KSA layers l} mean(clamp((a_s - a_t)^2, 0, c))

As the official code (muse/losses/distill.py): the teacher is the same model run without summary
tokens (no grad); KL is `F.kl_div(log p_s, log p_t, log_target=True)`, i.e. KL(teacher || student),
per label token; the MSE of layer l is clamped PER ELEMENT at c and then averaged over the layer's
label-carrying text tokens and features (so a layer far from its teacher still gets gradient from its
elements below the clamp), and only KSA layers enter the mean over layers (full layers give no
distillation output; the caller collects KSA layers only). With `distill_mse_rms_norm` (official
default: off) both outputs are first divided by (rms + 1e-6), the official formula. The MSE is counted
once per label token (n) so it keeps its weight after the Trainer's division.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from keel.model.loss import IGNORE_INDEX


def _chunk_terms(student, teacher, weight, labels):
    log_p_s = F.linear(student, weight).float().log_softmax(-1)
    log_p_t = F.linear(teacher, weight).float().log_softmax(-1)
    ce = F.nll_loss(log_p_s, labels, reduction="sum")
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    return torch.stack([ce, kl])


def rms_normalise(a: torch.Tensor) -> torch.Tensor:
    """The official `summary_distill_attention_norm`: x / (sqrt(mean(x^2)) + 1e-6) over features."""
    return a / (a.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)


def layer_mse(a_s: torch.Tensor, a_t: torch.Tensor, clamp: float, rms_norm: bool) -> torch.Tensor:
    """One layer's MSE term: squared error clamped per element to [0, clamp], then averaged."""
    a_s, a_t = a_s.float(), a_t.float().detach()
    if rms_norm:
        a_s, a_t = rms_normalise(a_s), rms_normalise(a_t)
    return (a_s - a_t).pow(2).clamp(0, clamp).mean()


def distillation_loss(student, teacher, weight, labels, student_attn, teacher_attn, cfg) -> torch.Tensor:
    """student/teacher: final-normed text hidden states [B, T, D]; *_attn: per-KSA-layer [B, T, D]."""
    keep = labels.flatten() != IGNORE_INDEX
    s, t, y = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep], labels.flatten()[keep]
    terms = student.new_zeros(2, dtype=torch.float32)
    chunk = cfg.loss_chunk
    recompute = s.requires_grad and s.shape[0] > chunk  # as keel.model.loss: one chunk of logits at a time
    for start in range(0, s.shape[0], chunk):
        args = (s[start:start + chunk], t[start:start + chunk], weight, y[start:start + chunk])
        terms = terms + (checkpoint(_chunk_terms, *args, use_reentrant=False) if recompute else _chunk_terms(*args))
    mse_terms = [layer_mse(a_s.flatten(0, 1)[keep], a_t.flatten(0, 1)[keep], cfg.distill_mse_clamp,
                           cfg.distill_mse_rms_norm) for a_s, a_t in zip(student_attn, teacher_attn)]
    mse = torch.stack(mse_terms).mean() if mse_terms and s.shape[0] else terms.new_zeros(())
    return (cfg.distill_ce_weight * terms[0] + cfg.distill_kl_weight * terms[1]
            + cfg.distill_mse_weight * mse * s.shape[0])
