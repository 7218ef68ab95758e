"""OneRec-V2 generative recommender (arXiv 2508.20900 §3.3) and its two Table 2 baselines. Single-device code.

lazy_decoder (the paper's): a context processor turns every context token (the user profile + each
history item) into one d_context = S_kv*L_kv*G_kv*d_head vector, split into KV sets with a
per-KV-layer RMSNorm_k / RMSNorm_v; the decoder runs only over [BOS, s1, ..., s_{L-1}] and its blocks
cross-attend to those KV sets with *no* K/V projections (q and o only, GQA with G_kv heads);
block l reads set floor(l*L_kv/N_layer). The context never passes through a transformer layer.
encoder_decoder (V1-style): a bidirectional encoder over the context tokens + a decoder whose
cross-attention projects K/V from the encoder output. naive_decoder: the context tokens are a
prefix of the causal sequence and run through every block.

Positions: RoPE, so the self-attention is backbone.Attention unchanged (and its TP names apply). In
the decoder every SID level also has its own rows of the token table (offsets), so a token's
identity already says its position. Context tokens carry order through a learned recency embedding
(a feature of the processor); under naive/encoder RoPE their positions count valid tokens only, so
left padding shifts nothing.

Entry points: model(batch) -> loss summed over valid targets (each target's mean NTP
over the L positions); model(batch, owner=, prefix=) -> next-code log-probs [M, sid_levels[t]].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.model.attention import AttentionMask
from keel.model.backbone import (Attention, RMSNorm, TransformerBlock, feed_forward_for, init_feed_forward,
                                 rope_inv_freq)
from keel.model.moe import MoEHooks
from keel.model.onerec_config import OneRecConfig


def feature_mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """V1's input pathway: Dense -> LeakyReLU -> Dense (the V2 paper does not give its processor; this is keel's choice)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, n_out))


class ContextProcessor(nn.Module):
    """Per-feature embeddings -> one token per context item + one user-profile token.

    Returns tokens [B, 1 + C, width] (the profile token first) and key validity [B, 1 + C]."""

    def __init__(self, cfg: OneRecConfig, width: int):
        super().__init__()
        self.cfg = cfg
        feats, d = cfg.context_features, cfg.d_feature
        self.item = nn.Embedding(cfg.n_items + 1, d) if "item" in feats else None
        self.sid = nn.Embedding(sum(cfg.sid_levels), d) if "sid" in feats else None
        self.rating = nn.Embedding(cfg.n_ratings, d) if "rating" in feats else None
        self.gap = nn.Embedding(cfg.n_gaps, d) if "gap" in feats else None
        self.recency = nn.Embedding(cfg.context_len, d) if cfg.context_positions else None
        # Row 0 is a constant profile row, then one block of rows per user feature (offsets).
        self.user = nn.Embedding(1 + sum(cfg.user_feature_sizes), d)
        self.register_buffer("sid_offsets", torch.empty(len(cfg.sid_levels), dtype=torch.long), persistent=False)
        self.register_buffer("user_offsets", torch.empty(len(cfg.user_feature_sizes), dtype=torch.long),
                             persistent=False)
        self.item_mlp = feature_mlp(cfg.item_feature_width(), cfg.context_hidden, width)
        self.user_mlp = feature_mlp(cfg.user_feature_width(), cfg.context_hidden, width)

    def embeddings(self):
        return [m for m in (self.item, self.sid, self.rating, self.gap, self.recency, self.user) if m is not None]

    @torch.no_grad()
    def init_buffers(self) -> None:
        levels = torch.tensor([0] + self.cfg.sid_levels[:-1]).cumsum(0)
        self.sid_offsets.copy_(levels.to(self.sid_offsets.device))
        users = 1 + torch.tensor([0] + self.cfg.user_feature_sizes[:-1], dtype=torch.long).cumsum(0)
        self.user_offsets.copy_(users[:len(self.cfg.user_feature_sizes)].to(self.user_offsets.device))

    def forward(self, batch):
        items = batch["ctx_items"]
        n_rows, n_ctx = items.shape
        parts = []
        if self.item is not None:
            parts.append(self.item(items))
        if self.sid is not None:
            parts.append(self.sid(batch["ctx_sids"] + self.sid_offsets).flatten(2))
        if self.rating is not None:
            parts.append(self.rating(batch["ctx_ratings"]))
        if self.gap is not None:
            parts.append(self.gap(batch["ctx_gaps"]))
        if self.recency is not None:  # slot counted from the newest (right) end, so more left padding moves nothing
            slot = (n_ctx - 1 - torch.arange(n_ctx, device=items.device)).clamp(max=self.cfg.context_len - 1)
            parts.append(self.recency(slot).expand(n_rows, -1, -1))
        item_tokens = self.item_mlp(torch.cat(parts, -1))
        profile = torch.zeros(n_rows, 1, dtype=torch.long, device=items.device)
        if self.cfg.user_features:
            profile = torch.cat([profile, batch["user_feats"] + self.user_offsets], 1)
        user_token = self.user_mlp(self.user(profile).flatten(1))[:, None]
        valid = torch.cat([torch.ones_like(items[:, :1], dtype=torch.bool), items != 0], 1)
        return torch.cat([user_token, item_tokens], 1), valid


def grouped_by_owner(owner: torch.Tensor, n_contexts: int):
    """R when owner is [0]*R + [1]*R + ... + [n_contexts-1]*R, else None."""
    rows = owner.shape[0]
    if rows % n_contexts:
        return None
    expected = torch.arange(n_contexts, device=owner.device).repeat_interleave(rows // n_contexts)
    return rows // n_contexts if torch.equal(owner, expected) else None


class CrossAttention(nn.Module):
    """Decoder rows attend to their owner's context. Lazy: K/V arrive ready ([B, G_kv, Lc, d_head],
    no projections here); otherwise K/V are projected from the encoder output [B, Lc, dim]."""

    def __init__(self, cfg: OneRecConfig, project_kv: bool):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.g_kv * cfg.head_dim, bias=False) if project_kv else None
        self.wv = nn.Linear(cfg.dim, cfg.g_kv * cfg.head_dim, bias=False) if project_kv else None
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, k, v, owner, ctx_valid, per_owner=None):
        if self.wk is not None:  # project on the B context rows, before the gather to the M decoder rows
            memory = k
            k = self.wk(memory).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
            v = self.wv(memory).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        rows, q_len, _ = x.shape
        gqa = k.shape[1] != self.wq.out_features // self.head_dim
        if per_owner is not None:
            # Rows come grouped by owner (training targets, beam search, exact scoring): each context
            # row's K/V serve its rows' queries in place, instead of one K/V copy per decoder row.
            q = self.wq(x).view(k.shape[0], per_owner * q_len, -1, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_valid[:, None, None, :], enable_gqa=gqa)
            return self.wo(out.transpose(1, 2).reshape(rows, q_len, -1))
        q = self.wq(x).view(rows, q_len, -1, self.head_dim).transpose(1, 2)
        k, v = k.index_select(0, owner), v.index_select(0, owner)
        mask = ctx_valid.index_select(0, owner)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(rows, q_len, -1))


class OneRecBlock(nn.Module):
    """Decoder block. lazy: cross -> self -> FFN (§3.3); encoder_decoder: self -> cross -> FFN (V1);
    naive: self -> FFN (no cross-attention)."""

    def __init__(self, cfg: OneRecConfig, layer_index: int):
        super().__init__()
        bcfg = cfg.backbone_config()
        self.cross_first = cfg.architecture == "lazy_decoder"
        has_cross = cfg.architecture != "naive_decoder"
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps) if has_cross else None
        self.cross_attention = CrossAttention(cfg, project_kv=not self.cross_first) if has_cross else None
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(bcfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = feed_forward_for(bcfg, layer_index)

    def forward(self, x, cos, sin, mask: AttentionMask, k=None, v=None, owner=None, ctx_valid=None, per_owner=None,
                cache=None):
        if self.cross_attention is not None and self.cross_first:
            x = x + self.cross_attention(self.cross_norm(x), k, v, owner, ctx_valid, per_owner)
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        if self.cross_attention is not None and not self.cross_first:
            x = x + self.cross_attention(self.cross_norm(x), k, v, owner, ctx_valid, per_owner)
        return x + self.feed_forward(self.ffn_norm(x))


class GrowingCache:
    """A block's self-attention keys and values so far, grown by concatenation: autograd can
    differentiate through it (training a decoder that feeds its own outputs back, as S²GR does),
    unlike generation's preallocated cache written in place."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v


def init_block(block: nn.Module, std: float, out_std: float) -> None:
    """Normal init of a decoder/encoder block's projections; output projections at the depth-scaled std."""
    attns = [block.attention] + [getattr(block, "cross_attention", None)]
    for attn in filter(None, attns):
        for lin in filter(None, (attn.wq, attn.wk, attn.wv)):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(attn.wo.weight, std=out_std)
    init_feed_forward(block.feed_forward, std, out_std)


class OneRec(MoEHooks, nn.Module):
    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        cfg.check_data_sizes()
        self.config = cfg
        self.lazy = cfg.architecture == "lazy_decoder"
        levels = cfg.sid_levels
        self.context = ContextProcessor(cfg, cfg.d_context)
        if self.lazy:  # RMSNorm_{k,l} (and RMSNorm_{v,l} when S_kv = 2) per KV layer
            width = cfg.g_kv * cfg.head_dim
            self.kv_norms = nn.ModuleList(RMSNorm(width, cfg.norm_eps) for _ in range(cfg.l_kv * cfg.s_kv))
        self.encoder = None
        if cfg.architecture == "encoder_decoder":  # dense, bidirectional (the mask says so), backbone blocks
            ecfg = cfg.backbone_config()
            ecfg.moe = None
            self.encoder = nn.ModuleDict({str(i): TransformerBlock(ecfg, i) for i in range(cfg.encoder_layers)})
            self.encoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Row 0 = BOS, then one block of rows per SID level 0..L-2 (the last level is never an input).
        self.tok_embeddings = nn.Embedding(1 + sum(levels[:-1]), cfg.dim)
        self.layers = nn.ModuleDict({str(i): OneRecBlock(cfg, i) for i in range(cfg.n_layers)})
        self.head_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in levels)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, v, bias=False) for v in levels)
        self.register_buffer("token_offsets", torch.empty(len(levels), dtype=torch.long), persistent=False)
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_buffers(self) -> None:
        self.context.init_buffers()
        offsets = 1 + torch.tensor([0] + self.config.sid_levels[:-1]).cumsum(0)
        self.token_offsets.copy_(offsets.to(self.token_offsets.device))
        self.rope_inv_freq.copy_(rope_inv_freq(self.config.backbone_config()).to(self.rope_inv_freq.device))

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        self.init_buffers()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for emb in self.context.embeddings() + [self.tok_embeddings]:
            nn.init.normal_(emb.weight, std=std)
        for mlp in (self.context.item_mlp, self.context.user_mlp):
            for lin in (mlp[0], mlp[2]):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
        blocks = list(self.layers.values()) + list(self.encoder.values() if self.encoder is not None else [])
        for block in blocks:
            init_block(block, std, out_std)
        for head in self.heads:
            nn.init.normal_(head.weight, std=std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    # ------------------------------------------------------------ pieces
    def rope(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.rope_inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def kv_sets(self, tokens: torch.Tensor):
        """Split [B, Lc, d_context] into L_kv (k, v) pairs of [B, G_kv, Lc, d_head] (§3.3)."""
        cfg = self.config
        chunks = tokens.chunk(cfg.s_kv * cfg.l_kv, dim=-1)
        heads = lambda t: t.unflatten(-1, (cfg.g_kv, cfg.head_dim)).transpose(1, 2)  # noqa: E731
        sets = []
        for layer in range(cfg.l_kv):
            k = heads(self.kv_norms[layer * cfg.s_kv](chunks[layer * cfg.s_kv]))
            v = heads(self.kv_norms[layer * cfg.s_kv + 1](chunks[layer * cfg.s_kv + 1])) if cfg.s_kv == 2 else k
            sets.append((k, v))
        return sets

    def decoder_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """[BOS, s_0, ..., s_{t-1}] token ids for codes [M, t] (each level in its own rows)."""
        t = codes.shape[1]
        bos = codes.new_zeros(codes.shape[0], 1)
        return torch.cat([bos, codes + self.token_offsets[:t]], 1)

    def decode(self, batch, owner: torch.Tensor, tokens: torch.Tensor, per_owner=None) -> torch.Tensor:
        """Hidden states [M, Lq, dim] of decoder token ids [M, Lq], row m using context row owner[m].
        per_owner R: the caller knows owner == [0]*R + [1]*R + ... (else it is checked here once)."""
        memory, ctx_valid = self.context_memory(batch)
        if per_owner is None:
            per_owner = grouped_by_owner(owner, ctx_valid.shape[0])
        return self.run_decoder(self.tok_embeddings(tokens), memory, ctx_valid, owner, per_owner)

    def context_memory(self, batch):
        """What the decoder reads of the context rows, computed once per batch: the lazy KV sets,
        the encoder's output (encoder_decoder) or the processed tokens (naive); and their validity."""
        context, ctx_valid = self.context(batch)
        if self.lazy:
            return self.kv_sets(context), ctx_valid
        if self.encoder is not None:  # V1-style encoder over the context, bidirectional among valid tokens
            cos, sin = self.rope(ctx_valid.long().cumsum(1) - 1)
            mask = AttentionMask(causal=False, key_valid=ctx_valid)
            mask.prepare(context.shape[1], context.shape[1], context.device)
            for block in self.encoder.values():
                context = block(context, cos, sin, mask)
            return self.encoder_norm(context), ctx_valid
        return context, ctx_valid

    def run_decoder(self, h, memory, ctx_valid, owner, per_owner=None, layers=None, caches=None):
        """The decoder blocks (`layers`: another stack of OneRecBlocks, e.g. S²GR's auxiliary
        decoder) over input vectors h [M, Lq, dim]. With `caches` (one GrowingCache per block) h
        continues the cached sequence: its positions start after the cached ones."""
        if self.config.architecture == "naive_decoder":
            return self._decode_naive(memory, ctx_valid, owner, h)
        start = caches[0].length if caches else 0
        q_len = h.shape[1]
        positions = torch.arange(start, start + q_len, device=h.device).expand(h.shape[0], q_len)
        cos, sin = self.rope(positions)
        mask = AttentionMask(causal=True, q_offset=start)
        k = v = memory  # encoder_decoder: the blocks project K/V from the encoder output
        for i, block in enumerate((layers if layers is not None else self.layers).values()):
            if self.lazy:
                k, v = memory[self.config.kv_set(i)]
            h = block(h, cos, sin, mask, k, v, owner, ctx_valid, per_owner, caches[i] if caches else None)
        return h

    def _decode_naive(self, context, ctx_valid, owner, h):
        """The context tokens are a prefix of every decoder row's causal sequence."""
        ctx_valid = ctx_valid.index_select(0, owner)
        x = torch.cat([context.index_select(0, owner), h], 1)
        valid = torch.cat([ctx_valid, torch.ones_like(ctx_valid[:, :h.shape[1]])], 1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # padding takes no position
        cos, sin = self.rope(positions)
        mask = AttentionMask(causal=True, key_valid=valid)
        mask.prepare(x.shape[1], x.shape[1], x.device)
        for block in self.layers.values():
            x = block(x, cos, sin, mask)
        return x[:, -h.shape[1]:]

    def level_logprobs(self, h: torch.Tensor, level: int) -> torch.Tensor:
        return F.log_softmax(self.heads[level](self.head_norms[level](h)).float(), -1)

    def code_logprobs(self, batch, codes: torch.Tensor) -> torch.Tensor:
        """log p(s^t | BOS, s^{<t}, context) [B, K, L] of K code paths [B, K, L] per context row,
        teacher-forced in one decoder pass (training targets, or an RL trainer's rollouts)."""
        n_rows, n_paths, n_levels = codes.shape
        flat = codes.flatten(0, 1)
        owner = torch.arange(n_rows, device=flat.device).repeat_interleave(n_paths)
        h = self.decode(batch, owner, self.decoder_inputs(flat[:, :-1]), per_owner=n_paths)
        logp = torch.stack([self.level_logprobs(h[:, t], t).gather(-1, flat[:, t:t + 1])[:, 0]
                            for t in range(n_levels)], 1)
        return logp.view(n_rows, n_paths, n_levels)

    # ------------------------------------------------------------ forward
    def forward(self, batch, owner=None, prefix=None):
        """model(batch) -> loss summed over valid targets; model(batch, owner=, prefix=) -> log-probs
        [M, sid_levels[t]] of the next code after prefix [M, t], using context row owner[m]."""
        if prefix is not None:
            h = self.decode(batch, owner, self.decoder_inputs(prefix))
            return self.level_logprobs(h[:, -1], prefix.shape[1])
        nll = -self.code_logprobs(batch, batch["target_sids"]).flatten(0, 1)  # [B*K, L]
        valid = batch["targets"].flatten() != 0
        loss = (nll.mean(1) * valid).sum()  # each target: mean NTP over its L codes (§3.3 L_Gen)
        aux = self.take_moe_aux_loss()
        if torch.is_tensor(aux):  # per-token MoE losses join weighted by this batch's valid targets
            loss = loss + aux * valid.sum()
        return loss


def build_onerec(cfg: OneRecConfig) -> OneRec:
    return OneRec(cfg)
