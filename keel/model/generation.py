"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, per-token logprobs.

Prompts of different lengths are left-padded; padding is masked out of attention and each
sequence's RoPE positions count only its real tokens, so a batched result equals running each
prompt alone. Returned logprobs are the model's own log-softmax (temperature 1, no top-p) of the
chosen tokens, which is what an RL trainer recomputes and compares against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from keel.model.attention import AttentionMask


class LayerCache:
    def __init__(self, cache: "KVCache", index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        end = c.length + k.shape[2]
        c.k[self.index][:, :, c.length:end] = k
        c.v[self.index][:, :, c.length:end] = v
        return c.k[self.index][:, :, :end], c.v[self.index][:, :, :end]


class KVCache:
    """Keys and values of every layer for a batch, plus which slots hold real tokens."""

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, max_len, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int):
        cfg = model.config
        param = model.tok_embeddings.weight
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len, param.dtype, param.device)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def append_valid(self, valid: torch.Tensor) -> None:
        """Mark which of the next valid.shape[1] slots hold real tokens (before the forward)."""
        self.valid[:, self.length:self.length + valid.shape[1]] = valid

    def positions_and_mask(self, seq: int):
        end = self.length + seq
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        valid = self.valid[:, :end]
        if self.length == 0 and seq > 1 and bool(valid.all()):
            # A prefill of unpadded rows into an empty cache is plain causal attention: no mask is
            # built, so SDPA takes its causal kernel (a dense [L, L] mask of a 128k-token prompt
            # alone would be 16 GiB). One host sync per prefill, none per decoded token.
            return torch.arange(seq, device=valid.device).expand(valid.shape[0], seq), AttentionMask(causal=True)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, self.length:end]
        return positions, AttentionMask(causal=True, q_offset=self.length, key_valid=valid)

    def advance(self, seq: int) -> None:
        self.length += seq


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per prompt (stop token included when hit)
    logprobs: list[list[float]]  # log p(token) under the model, one per generated token


def processed_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The logits of the distribution actually sampled from: scaled by 1 / temperature, then cut to the
    top k and to the top-p nucleus (-inf outside). Its log-softmax is the sampler's log-probability."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one token per row of logits [B, V]."""
    return sample_with_logprobs(logits, temperature, top_k, top_p, generator)[0]


def sample_with_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         generator: Optional[torch.Generator], uniforms: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(one token per row of logits [B, V], its log-probability under the distribution it was drawn
    from: the processed one, truncated and renormalised; the raw model's for greedy decoding).

    `uniforms` [B] in [0, 1): draw each row by inverting its own cumulative distribution at its own
    number instead of from `generator`. A row's token then depends on that row and its number
    alone, not on which other rows share the batch (what makes RL rollouts independent of how
    prompts are spread over ranks and decode slots)."""
    if temperature <= 0:
        token = logits.argmax(dim=-1)
        return token, logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
    processed = processed_logits(logits, temperature, top_k, top_p)
    probs = processed.softmax(-1)
    if uniforms is None:
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        token = inverse_cdf_sample(probs, uniforms)
    return token, processed.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row of probs [B, V] whose cumulative mass first exceeds that row's uniform
    (scaled by the row's total, so rounding in the sum cannot push it past the end); never a token
    of zero probability (a truncated one)."""
    cumulative = probs.cumsum(-1)
    target = uniforms.to(probs.dtype)[:, None] * cumulative[:, -1:]
    token = (cumulative <= target).sum(-1)
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(token, last_possible)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple = (), seed: Optional[int] = None
             ) -> GenerationOutput:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, device=device)
        valid[i, longest - len(p):] = True
    # A family with its own cache layout (KSA) provides new_kv_cache; it takes the same calls as KVCache.
    new_cache = getattr(model, "new_kv_cache", None) or (lambda b, n: KVCache.for_model(model, b, n))
    cache = new_cache(batch, longest + max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)

    cache.append_valid(valid)
    logits = model(ids, cache=cache)[:, -1].float()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        logprobs.append(logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1))
        tokens.append(nxt)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        cache.append_valid(torch.ones(batch, 1, dtype=torch.bool, device=device))
        logits = model(nxt[:, None], cache=cache)[:, -1].float()
    out_tokens, out_logprobs = [], []
    tok = torch.stack(tokens, 1).tolist()
    lp = torch.stack(logprobs, 1).tolist()
    for row_t, row_l in zip(tok, lp):
        cut = next((j + 1 for j, t in enumerate(row_t) if t in stop_ids), len(row_t))
        out_tokens.append(row_t[:cut])
        out_logprobs.append(row_l[:cut])
    return GenerationOutput(out_tokens, out_logprobs)
