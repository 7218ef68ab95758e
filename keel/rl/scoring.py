"""Scoring response tokens under a model: the per-token log-probabilities DPO and distillation need,
and the full next-token distributions at response positions when a full-vocabulary KL is wanted.

Sequences are right-padded [B, L] with a bool `response_mask` marking the response tokens; token t
is scored by the logits at t-1. Only response positions go through the LM head, so the
[tokens x vocab] logits exist for the responses alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def response_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      full: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(token_logps [B, L], zero off the response; full log-softmax [N, V] of the N response
    positions in row-major order, or None unless `full`)."""
    hidden = model.hidden_states(input_ids)  # [B, L, D]
    scored = response_mask[:, 1:]  # token t (t >= 1) is predicted at t-1
    logits = F.linear(hidden[:, :-1][scored], model.head_weight()).float()  # [N, V]
    log_probs = logits.log_softmax(-1)
    targets = input_ids[:, 1:][scored]
    picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    token_logps = torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device)
    token_logps = torch.cat([token_logps[:, :1], token_logps[:, 1:].masked_scatter(scored, picked)], dim=1)
    return token_logps, (log_probs if full else None)


def full_vocab_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of [N, V] log-probabilities: sum_v p(v) (log p(v) - log q(v))."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)
