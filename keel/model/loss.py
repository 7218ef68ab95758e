"""Next-token loss that never holds the full [tokens x vocab] logits.

The LM head and cross-entropy run chunk by chunk; when there is more than one chunk, each is
checkpointed, so its logits are freed after the forward and recomputed in the backward. Peak
logits memory is one chunk's worth, which lets 150k-entry vocabularies train at long sequences.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Sum of cross-entropy over rows of hidden [N, D] against labels [N] (-100 ignored)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    # One chunk's logits are the peak either way; recomputing pays off only when there are several.
    recompute = hidden.requires_grad and hidden.shape[0] > chunk
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if recompute:
            total = total + checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y)
    return total
