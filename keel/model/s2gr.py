"""S²GR: generative recommendation with stepwise latent reasoning, on OneRec's encoder-decoder. Single-device code.

The decoder is TIGER-like: an encoder over the user's context (OneRec's context processor + bidirectional
backbone blocks) and a causal decoder that cross-attends to it and emits an item's semantic ID code by
code. S²GR inserts a *thought* before every code: the decoder's own output at the end of the prefix,
fed back as the next input vector (plus a learned level embedding p_l), so the sequence is

    BOS -> t_1 -> s_1 -> t_2 -> s_2 -> ... -> t_L -> s_L

and s_l is predicted at t_l's position. A thought is a deterministic function of the prefix, so beam
search over codes is unchanged: each beam computes its thought and only codes expand the beam.

Training signals beside the codes' NTP loss (the paper's formulas as far as they are known; the rest is
keel's choice and a key of `model.s2gr`):
  alignment  per quantised level, a softmax over the cosine of the projected thought to K_c coarse
             centres (k-means of that level's code vectors) against the target code's centre;
  InfoNCE    an auxiliary decoder of half the depth reads [BOS] and gives v_g; its projection is
             contrasted in-batch with the target item's quantised vector (the sum of its code vectors,
             equal under cosine to the paper's mean); rows with the same target item are not negatives;
  regulariser 1 - cos(t_1, sg(v_g)), so the first thought leans towards the auxiliary guess.
keel's choices: the thought is RMS-normalised before it is fed back (decoder outputs and token embeddings
have different scales); the alignment and InfoNCE projections are linear maps to the codebook's width;
the de-duplication level gets a thought but no alignment (it has no code vectors).
`model.s2gr.thinking: false` is the TIGER baseline: the parent encoder-decoder, nothing added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.backbone import RMSNorm
from keel.model.onerec import GrowingCache, OneRec, OneRecBlock, init_block
from keel.model.onerec_config import OneRecConfig


@dataclass
class ThinkingConfig:
    thinking: bool = True  # a latent thought before every SID code; false: the TIGER baseline (same code, no extras)
    align_weight: float = 1.0  # weight of the alignment loss (summed over the quantised levels)
    align_clusters: int = 8  # K_c: coarse clusters of each level's code vectors (the paper does not give it)
    align_tau: float = 0.1  # temperature of the alignment softmax over cosines
    infonce_weight: float = 1.0  # weight of the auxiliary decoder's in-batch InfoNCE
    infonce_tau: float = 0.1  # temperature of that InfoNCE
    reg_weight: float = 0.1  # lambda of 1 - cos(t_1, sg(v_g))
    aux_layers: int = 0  # depth of the auxiliary decoder; 0: half the decoder's (at least 1)

    def validate(self, key: str = "model.s2gr") -> None:
        for name in ("align_weight", "infonce_weight", "reg_weight", "aux_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("align_tau", "infonce_tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(self, name)}")
        if self.align_clusters < 1:
            raise ConfigError(f"{key}.align_clusters: must be >= 1, got {self.align_clusters}")


@dataclass
class S2GRConfig(OneRecConfig):
    name: str = "s2gr"  # the family
    architecture: Literal["encoder_decoder"] = "encoder_decoder"  # TIGER-like: an encoder over the context, a cross-attending decoder
    s2gr: ThinkingConfig = field(default_factory=ThinkingConfig)  # the latent reasoning
    code_dim: int = 0  # filled by the task: width of the SID table's code vectors
    code_levels: int = 0  # filled by the task: levels with code vectors (the de-dup level has none)

    def __post_init__(self):
        super().__post_init__()
        self.s2gr.aux_layers = self.s2gr.aux_layers or max(1, self.n_layers // 2)

    def validate(self) -> None:
        super().validate()
        self.s2gr.validate()

    def check_data_sizes(self) -> None:
        super().check_data_sizes()
        if self.s2gr.thinking and (self.code_dim <= 0 or not 0 < self.code_levels < len(self.sid_levels) + 1):
            raise ConfigError("model.code_dim: not set (the task fills it from the SID table's code vectors)")

    def backbone_config(self):
        cfg = super().backbone_config()
        cfg.max_seq_len += len(self.sid_levels)  # a thought before every code
        return cfg

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        total = super().num_params(embeddings, active)
        if not self.s2gr.thinking:
            return total
        d, hd, kv = self.dim, self.n_heads * self.head_dim, self.g_kv * self.head_dim
        block = 6 * d * hd + 2 * d * kv + 3 * d + 3 * d * self.ffn_dim  # self + cross attention, FFN, 3 norms
        extras = len(self.sid_levels) * d + d  # level embeddings p_l, the thought's norm
        extras += self.s2gr.aux_layers * block + d + 2 * d * self.code_dim  # aux decoder, its norm, 2 projections
        return total + extras


class S2GR(OneRec):
    def __init__(self, cfg: S2GRConfig):
        super().__init__(cfg)
        self.thinking = cfg.s2gr.thinking
        if self.thinking:
            self.level_embeddings = nn.Embedding(len(cfg.sid_levels), cfg.dim)  # p_l
            self.thought_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.align_proj = nn.Linear(cfg.dim, cfg.code_dim, bias=False)
            self.aux_layers = nn.ModuleDict({str(i): OneRecBlock(cfg, i) for i in range(cfg.s2gr.aux_layers)})
            self.aux_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.aux_proj = nn.Linear(cfg.dim, cfg.code_dim, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if not self.thinking:
            return
        cfg = self.config
        std = cfg.init_std
        for block in self.aux_layers.values():
            init_block(block, std, std / (2 * cfg.s2gr.aux_layers) ** 0.5)
        for weight in (self.level_embeddings.weight, self.align_proj.weight, self.aux_proj.weight):
            nn.init.normal_(weight, std=std)

    # ------------------------------------------------------------ thinking
    def thought_input(self, thought: torch.Tensor, level: int) -> torch.Tensor:
        """The vector a thought [M, dim] is fed back as: [M, 1, dim]."""
        return (self.thought_norm(thought) + self.level_embeddings.weight[level])[:, None]

    def think(self, memory, ctx_valid, owner, codes: torch.Tensor, n_levels: int, per_owner=None):
        """For teacher-forced codes [M, >= n-1]: the hidden states [M, n, dim] at the thoughts'
        positions of [BOS, t_1, s_1, ..., s_{n-1}, t_n] (s_l's logits read the l-th) and the
        thoughts themselves [M, n, dim]. Each thought needs the one before it, so the decoder runs
        n + 1 times, each pass on the 1-2 new inputs only (self-attention keys and values cached)."""
        caches = [GrowingCache() for _ in self.layers]
        new = self.tok_embeddings(codes.new_zeros(codes.shape[0], 1))
        thoughts, at_thoughts = [], []
        for level in range(n_levels + 1):
            h = self.run_decoder(new, memory, ctx_valid, owner, per_owner, caches=caches)
            if level:
                at_thoughts.append(h[:, 0])  # the input of this pass began with thought t_level
            if level == n_levels:
                break
            thoughts.append(h[:, -1])
            parts = [self.thought_input(thoughts[-1], level)]
            if level < n_levels - 1:
                parts.append(self.tok_embeddings(codes[:, level:level + 1] + self.token_offsets[level]))
            new = torch.cat(parts, 1)
        return torch.stack(at_thoughts, 1), torch.stack(thoughts, 1)

    def _teacher_forced(self, batch, codes: torch.Tensor):
        """log p of code paths [B, K, L] per context row, with the thoughts and what the auxiliary
        decoder needs (the memory is computed once)."""
        n_rows, n_paths, n_levels = codes.shape
        flat = codes.flatten(0, 1)
        owner = torch.arange(n_rows, device=flat.device).repeat_interleave(n_paths)
        memory, ctx_valid = self.context_memory(batch)
        h, thoughts = self.think(memory, ctx_valid, owner, flat[:, :-1], n_levels, per_owner=n_paths)
        logp = torch.stack([self.level_logprobs(h[:, t], t).gather(-1, flat[:, t:t + 1])[:, 0]
                            for t in range(n_levels)], 1)
        return logp.view(n_rows, n_paths, n_levels), thoughts, (memory, ctx_valid, owner, n_paths)

    def code_logprobs(self, batch, codes: torch.Tensor) -> torch.Tensor:
        if not self.thinking:
            return super().code_logprobs(batch, codes)
        return self._teacher_forced(batch, codes)[0]

    # ------------------------------------------------------------ auxiliary losses
    def align_loss(self, thoughts: torch.Tensor, clusters: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Per row: sum over quantised levels of -log softmax_k(cos(W t_l, c_{l,k}) / tau)[g_l(s_l)]."""
        z = F.normalize(self.align_proj(thoughts[:, :centres.shape[0]]).float(), dim=-1)  # [M, Lq, cd]
        logits = torch.einsum("mlc,lkc->mlk", z, F.normalize(centres.float(), dim=-1)) / self.config.s2gr.align_tau
        return F.cross_entropy(logits.flatten(0, 1), clusters.flatten(), reduction="none").view(z.shape[:2]).sum(1)

    def aux_guess(self, memory, ctx_valid, owner, per_owner) -> torch.Tensor:
        """v_g [M, dim]: the auxiliary decoder's output at BOS."""
        bos = self.tok_embeddings(owner.new_zeros(owner.shape[0], 1))
        return self.aux_norm(self.run_decoder(bos, memory, ctx_valid, owner, per_owner, layers=self.aux_layers))[:, 0]

    def infonce_loss(self, guess: torch.Tensor, code_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per row: in-batch InfoNCE of the projected guess against every valid row's target vector;
        a row whose target is the same item is not a negative, padding rows are nobody's."""
        q = F.normalize(self.aux_proj(guess).float(), dim=-1)
        k = F.normalize(code_vectors.float(), dim=-1)
        logits = q @ k.T / self.config.s2gr.infonce_tau
        others = ~torch.eye(len(items), dtype=torch.bool, device=items.device)  # a row's own column stays finite
        not_negative = ((items[:, None] == items[None, :]) | (items == 0)[None, :]) & others
        logits = logits.masked_fill(not_negative, -float("inf"))
        return F.cross_entropy(logits, torch.arange(len(items), device=items.device), reduction="none")

    # ------------------------------------------------------------ forward
    def forward(self, batch, owner=None, prefix=None):
        """As OneRec.forward: the training loss summed over valid targets, or with owner/prefix the
        next code's log-probs [M, sid_levels[t]] (each beam row thinks its own thoughts first)."""
        if not self.thinking:
            return super().forward(batch, owner, prefix)
        if prefix is not None:
            memory, ctx_valid = self.context_memory(batch)
            h, _ = self.think(memory, ctx_valid, owner, prefix, prefix.shape[1] + 1)
            return self.level_logprobs(h[:, -1], prefix.shape[1])
        t = self.config.s2gr
        logp, thoughts, (memory, ctx_valid, owner, per_owner) = self._teacher_forced(batch, batch["target_sids"])
        items = batch["targets"].flatten()
        valid = items != 0
        per_row = -logp.flatten(0, 1).mean(1)  # mean NTP over the L codes, as OneRec
        if t.align_weight:
            per_row = per_row + t.align_weight * self.align_loss(
                thoughts, batch["target_clusters"].flatten(0, 1), batch["align_centres"])
        if t.infonce_weight or t.reg_weight:
            guess = self.aux_guess(memory, ctx_valid, owner, per_owner)
            if t.infonce_weight:
                nce = self.infonce_loss(guess, batch["target_code_vectors"].flatten(0, 1), items)
                per_row = per_row + t.infonce_weight * nce.masked_fill(~valid, 0.0)
            if t.reg_weight:
                per_row = per_row + t.reg_weight * (1 - F.cosine_similarity(thoughts[:, 0], guess.detach(), dim=-1))
        return (per_row * valid).sum()


def build_s2gr(cfg: S2GRConfig) -> S2GR:
    return S2GR(cfg)
