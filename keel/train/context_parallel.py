"""Context parallelism: a long sequence split over `parallel.cp` ranks, attention kept exact.

Load balancing for the causal mask: the sequence is cut into 2*cp chunks and cp rank r holds
chunks r and 2*cp-1-r, so every rank has the same share of early (cheap) and late (expensive)
queries. Attention all-gathers keys and values along the sequence (Megatron's "allgather"
context-parallel flavour, as used for Llama 3): each rank attends its queries to the whole
sequence under the causal and document masks built from global positions. All-gather's backward
sums the key/value gradients back to their owners.

The wrapper replaces each block's attention core from outside the model; model files are unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.attention import AttentionMask


def local_token_index(seq_len: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions of the tokens a cp rank holds, for a full sequence of seq_len tokens."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_batch(batch: dict, cp_rank: int, cp: int) -> dict:
    """This cp rank's tokens of every [B, L] tensor in a micro-batch."""
    # data.seq_len is divisible by 2 * cp: keel/config.py refuses any other recipe.
    index = local_token_index(batch["input_ids"].shape[1], cp_rank, cp, batch["input_ids"].device)
    return {key: value[:, index] for key, value in batch.items()}


class ContextParallelAttention:
    """Wraps an attention core: gathers K/V (and document ids) over the cp group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _gather_sequence(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather along `dim` and put the chunks back in global order (differentiable)."""
        parts = dist_fn.all_gather(local.contiguous(), group=self.group)
        chunks = [None] * (2 * self.cp)
        for r, part in enumerate(parts):
            first, second = part.chunk(2, dim=dim)
            chunks[r], chunks[2 * self.cp - 1 - r] = first, second
        return torch.cat(chunks, dim=dim)

    def __call__(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        if mask.key_valid is not None or mask.q_offset:
            raise NotImplementedError("context parallelism is for training, not cached generation")
        local_len = q.shape[2]
        full_k, full_v = self._gather_sequence(k, 2), self._gather_sequence(v, 2)
        q_pos = local_token_index(local_len * self.cp, self.rank, self.cp, q.device)
        k_pos = torch.arange(full_k.shape[2], device=q.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if mask.doc_ids is not None:  # mask.doc_ids holds this rank's tokens only
            with torch.no_grad():
                full_docs = self._gather_sequence(mask.doc_ids, 1)
            allowed = allowed & (mask.doc_ids[:, None, :, None] == full_docs[:, None, None, :])
        return F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=allowed,
                                              enable_gqa=q.shape[1] != k.shape[1])


def apply_context_parallel(model: torch.nn.Module, cp_mesh, attention: str) -> None:
    if attention != "sdpa":
        raise ConfigError(f"parallel.cp: context parallelism supports the 'sdpa' attention core, "
                          f"not model.attention={attention!r}")
    wrapper = ContextParallelAttention(cp_mesh.get_group())
    for block in model.layers.values():
        block.attention.core = wrapper
