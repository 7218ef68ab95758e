"""KSA stage-1 self-distillation loss (docs/ksa.md#stage-1-distillation-loss), as a per-token SUM (the
Trainer divides by the global count of label tokens, like the plain next-token loss).

    L = ce_w * CE + kl_w * KL(teacher || student) + ce-count * mse_w * mean_layers(clamp(MSE_l, 0, c))

The teacher is the same model run without summary tokens (no grad). KL is the reference's
`F.kl_div(log p_s, log p_t, log_target=True)`, i.e. KL(teacher || student), per label token.
MSE_l compares layer l's attention output (after o-projection) at text positions that carry a label,
optionally RMS-normalised; it is a mean over this micro-batch's tokens, and keel clamps that per-layer
mean (the official code clamps per element, then averages: a known difference, listed in
docs/ksa.md#not-implemented-known-gaps). It is then counted once per label token so it keeps its
weight after the Trainer's division.
Other places where keel departs from the official code (docs/ksa.md#choices-where-the-paper-is-silent):
every layer's attention output enters the mean (full layers too: their inputs move with the KSA layers
below; the official code uses KSA layers only), and the RMS normalisation is on by default
(`KSAConfig.distill_mse_rms_norm`; the official default is off).
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


def distillation_loss(student, teacher, weight, labels, student_attn, teacher_attn, cfg) -> torch.Tensor:
    """student/teacher: final-normed text hidden states [B, T, D]; *_attn: per-layer [B, T, D]."""
    keep = labels.flatten() != IGNORE_INDEX
    s, t, y = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep], labels.flatten()[keep]
    terms = student.new_zeros(2, dtype=torch.float32)
    chunk = cfg.loss_chunk
    recompute = s.requires_grad and s.shape[0] > chunk  # as keel.model.loss: one chunk of logits at a time
    for start in range(0, s.shape[0], chunk):
        args = (s[start:start + chunk], t[start:start + chunk], weight, y[start:start + chunk])
        terms = terms + (checkpoint(_chunk_terms, *args, use_reentrant=False) if recompute else _chunk_terms(*args))
    mse_terms = []
    for a_s, a_t in zip(student_attn, teacher_attn):
        a_s, a_t = a_s.flatten(0, 1)[keep].float(), a_t.flatten(0, 1)[keep].float()
        if cfg.distill_mse_rms_norm:
            a_s, a_t = F.rms_norm(a_s, (a_s.shape[-1],)), F.rms_norm(a_t, (a_t.shape[-1],))
        mse_terms.append(F.mse_loss(a_s, a_t).clamp(0, cfg.distill_mse_clamp))
    mse = torch.stack(mse_terms).mean() if mse_terms and s.shape[0] else terms.new_zeros(())
    return (cfg.distill_ce_weight * terms[0] + cfg.distill_kl_weight * terms[1]
            + cfg.distill_mse_weight * mse * s.shape[0])
