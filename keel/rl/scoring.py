"""Scoring response tokens under a model: per-token log-probabilities (GRPO's trainer side, DPO,
distillation), entropies, and — when a full-vocabulary KL is wanted — the full next-token
distributions at response positions.

Sequences are right-padded [B, L] with a bool `response_mask` marking the response tokens; token t
is scored by the logits at t-1. Only response positions go through the LM head, and they do so in
chunks of `chunk` tokens, each checkpointed when gradients flow, so at most [chunk x vocab] logits
exist at once in the forward and the backward (a GoLongRL micro-batch of responses would otherwise
hold tens of GB of fp32 logits). The full-vocabulary path (`full=True`) returns [N x vocab] by its
nature: it is for the distillation signal that needs it, on micro-batches sized for it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SCORE_CHUNK = 1024  # response tokens whose logits exist at once


def _chunk_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    log_probs = logits.log_softmax(-1)
    picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else torch.zeros_like(picked)
    return picked, entropy


def token_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 with_entropy: bool = False, chunk: int = SCORE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], entropy [N] (zeros unless `with_entropy`)) for rows hidden [N, D] under
    softmax(hidden @ weight.T / temperature), computed `chunk` rows at a time."""
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and hidden.shape[0] > chunk
    picked, entropy = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, targets[start:start + chunk], temperature, with_entropy)
        p, e = checkpoint(_chunk_scores, *args, use_reentrant=False) if recompute else _chunk_scores(*args)
        picked.append(p)
        entropy.append(e)
    if not picked:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(picked), torch.cat(entropy)


def _scatter(values: torch.Tensor, scored: torch.Tensor, shape) -> torch.Tensor:
    """[N] values at the `scored` positions of a zero [B, L] tensor (position t holds token t's)."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return torch.cat([out[:, :1], out[:, 1:].masked_scatter(scored, values)], dim=1)


def logprobs_of(model: torch.nn.Module, sequences: torch.Tensor, response_mask: torch.Tensor,
                temperature: float = 1.0, with_entropy: bool = False, chunk: int = SCORE_CHUNK):
    """log p(token_t | tokens_<t) [B, L] at the response positions (0 elsewhere), under
    softmax(logits / temperature) — the rollout engines' convention — and, with `with_entropy`,
    the per-token entropy [B, L] of that distribution too."""
    hidden = model.hidden_states(sequences)
    scored = response_mask[:, 1:]  # token t is predicted from position t - 1
    picked, entropy = token_scores(hidden[:, :-1][scored], model.head_weight(), sequences[:, 1:][scored],
                                   temperature, with_entropy, chunk)
    out = _scatter(picked, scored, sequences.shape)
    return (out, _scatter(entropy, scored, sequences.shape)) if with_entropy else out


def packed_logprobs_of(model: torch.nn.Module, sequences: torch.Tensor, response_mask: torch.Tensor,
                       lengths: list[int], temperature: float = 1.0, with_entropy: bool = False,
                       chunk: int = SCORE_CHUNK):
    """`logprobs_of`, with the right-padded rows [B, L] packed end to end into one row of sum(lengths)
    tokens for the forward (document masking keeps each sequence to itself, positions restart), so
    no compute goes to padding; the results come back in the padded [B, L] layout (a response
    token's place among all response tokens is the same in both layouts). Every sequence must start
    with at least one prompt token."""
    device = sequences.device
    ids = torch.cat([sequences[i, :n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i, device=device, dtype=torch.long) for i, n in enumerate(lengths)])[None]
    packed_mask = torch.cat([response_mask[i, :n] for i, n in enumerate(lengths)])[None]
    hidden = model.hidden_states(ids, positions=positions, doc_ids=doc_ids)
    scored = packed_mask[:, 1:]  # a response token's predecessor is in its own sequence (prompts are not empty)
    picked, entropy = token_scores(hidden[:, :-1][scored], model.head_weight(), ids[:, 1:][scored],
                                   temperature, with_entropy, chunk)
    out = _scatter(picked, response_mask[:, 1:], sequences.shape)
    return (out, _scatter(entropy, response_mask[:, 1:], sequences.shape)) if with_entropy else out


def response_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      full: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(token_logps [B, L], zero off the response; full log-softmax [N, V] of the N response
    positions in row-major order, or None unless `full`)."""
    if not full:
        return logprobs_of(model, input_ids, response_mask), None
    hidden = model.hidden_states(input_ids)  # [B, L, D]
    scored = response_mask[:, 1:]
    log_probs = F.linear(hidden[:, :-1][scored], model.head_weight()).float().log_softmax(-1)  # [N, V]
    picked = log_probs.gather(-1, input_ids[:, 1:][scored][:, None]).squeeze(-1)
    return _scatter(picked, scored, input_ids.shape), log_probs


def full_vocab_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of [N, V] log-probabilities: sum_v p(v) (log p(v) - log q(v))."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)
