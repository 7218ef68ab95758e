"""Kelix's next-block-prediction (NBP) head. Single-device code.

The LLM runs one position per block; from the hidden state h_t a small autoregressive decoder emits
the sub-tokens of block t+1: for a text block [token, q_eos], for an image patch [c_0 .. c_{n_q-1},
q_eos]. Teacher forcing (training): the head's input sequence is
    [in_proj(h_t), in_proj(E[y_0]), ..., in_proj(E[y_{W-2}])]
with E the LLM's own (extended) embedding table and y the next block's sub-ids; its outputs go
through out_proj back to the LLM width and then through the LLM's shared output layer. Generation
feeds the head its own draws, one sub-token at a time, and stops at q_eos.

The head's layers are the backbone's TransformerBlock (causal, RoPE over the sub-token index) at a
reduced width, as Kelix's `reduce=True` head (d_model 512 from the 8B model's 4096). Kelix's head
also adds learned position embeddings; here RoPE already says the index, and an image sub-id says
its sub-codebook by its id range, so none are added (keel's choice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.model.attention import AttentionMask
from keel.model.backbone import RMSNorm, TransformerBlock, TransformerConfig, init_block, rope_inv_freq


@dataclass
class NBPConfig:
    dim: int = 64  # the head's width (Kelix: 512 under a 4096-wide LLM)
    layers: int = 1  # causal blocks over the sub-tokens of one block
    heads: int = 4  # attention heads of the head's blocks
    ffn_dim: int = 128  # SwiGLU hidden width of the head's blocks


class NextBlockHead(nn.Module):
    def __init__(self, llm_dim: int, block_width: int, cfg: NBPConfig, norm_eps: float = 1e-5):
        super().__init__()
        self.block_width = block_width
        self.inner = TransformerConfig(name="nbp_head", dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads,
                                       ffn_dim=cfg.ffn_dim, norm_eps=norm_eps, max_seq_len=block_width)
        self.in_proj = nn.Linear(llm_dim, cfg.dim, bias=False)
        self.layers = nn.ModuleList(TransformerBlock(self.inner, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, norm_eps)
        self.out_proj = nn.Linear(cfg.dim, llm_dim, bias=False)
        self.register_buffer("rope_inv_freq", torch.empty(self.inner.head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.rope_inv_freq.copy_(rope_inv_freq(self.inner).to(self.rope_inv_freq.device))

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        self.init_buffers()
        out_std = init_std / (2 * len(self.layers)) ** 0.5
        for lin in (self.in_proj, self.out_proj):
            nn.init.normal_(lin.weight, std=init_std)
        for block in self.layers:
            init_block(block, init_std, out_std)
        self.norm.reset_parameters()

    def forward(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """h [N, llm_dim] (the LLM state of the position before the block), prev [N, S, llm_dim]
        (embeddings of the block's first S sub-tokens, S < block_width) -> [N, 1 + S, llm_dim]: the
        state that predicts sub-token j at row j."""
        x = torch.cat([self.in_proj(h)[:, None], self.in_proj(prev)], dim=1)
        seq = x.shape[1]
        positions = torch.arange(seq, device=x.device)
        freqs = positions.float()[:, None] * self.rope_inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None], emb.sin()[None]
        mask = AttentionMask(causal=True)
        mask.prepare(seq, seq, x.device)
        for block in self.layers:
            x = block(x, cos, sin, mask)
        return self.out_proj(self.norm(x))


def teacher_forced_loss(head: NextBlockHead, embed, head_weight: torch.Tensor, h: torch.Tensor,
                        targets: torch.Tensor, ignore_index: int = -100,
                        row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of every target sub-token: h [N, llm_dim], targets [N, W] (the next
    block's sub-ids, ignore_index after its q_eos), each row's terms times row_weight [N] if given.
    `embed` maps ids to LLM-width embeddings."""
    prev = embed(targets[:, :-1].clamp(min=0))
    out = head(h, prev)
    logits = F.linear(out, head_weight).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none")
    if row_weight is not None:
        loss = loss.view(targets.shape) * row_weight[:, None]
    return loss.sum()


@torch.no_grad()
def generate_block(head: NextBlockHead, embed, head_weight: torch.Tensor, h: torch.Tensor, allowed: torch.Tensor,
                   stop_id: int, temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sub-tokens of the next block for each row of h [N, llm_dim]: allowed [W, V] bool says which
    ids sub-token j may take. Greedy at temperature 0. Returns [N, W] with `stop_id` at each row's
    stop and stop_id repeated after it (a row stops at its first stop_id)."""
    rows, width = h.shape[0], allowed.shape[0]
    out = torch.full((rows, width), stop_id, dtype=torch.long, device=h.device)
    done = torch.zeros(rows, dtype=torch.bool, device=h.device)
    prev = h.new_zeros(rows, 0, h.shape[1])
    for j in range(width):
        logits = F.linear(head(h, prev)[:, -1], head_weight).float()
        logits = logits.masked_fill(~allowed[j], float("-inf"))
        if temperature > 0:
            draw = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            draw = logits.argmax(-1)
        draw = torch.where(done, torch.full_like(draw, stop_id), draw)
        out[:, j] = draw
        done |= draw == stop_id
        if bool(done.all()):
            break
        prev = torch.cat([prev, embed(draw)[:, None]], dim=1)
    return out
