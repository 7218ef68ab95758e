"""Kelix-Tok (Kelix's image tokenizer): ViT -> 2x2 patch merge -> N independent SimVQ sub-codebooks -> sum fusion.

Single-device code at Fashion-MNIST scale (28x28 grey images; the paper's ViT is Keye-VL's NaViT):
  patches  patch_size^2 pixels -> Linear, + learned positions, `vit_layers` bidirectional backbone
           blocks (identity RoPE: the learned table carries position, as in sasrec.py), RMSNorm;
  merge    Keye's mlp_AR projector: the 2x2 neighbouring patch features are concatenated, then
           LayerNorm -> Linear -> GELU -> Linear to out_dim (the LLM width);
  encoder  Linear(out_dim -> n_q * code_dim), chunked into n_q parts, one per sub-codebook;
  SimVQ    each part: frozen codebook [K, init_dim] (a buffer) -> trainable proj Linear(init_dim ->
           code_dim) -> LayerNorm; the input gets its own LayerNorm; code = argmin squared L2;
           straight-through z_q = z_e + (e - z_e).detach();
  fusion   per-sub-codebook Linear(code_dim -> out_dim), summed: one vector per merged patch, so an
           image costs num_patches LLM positions whatever n_q is.
Loss = codebook_weight * mean_i MSE(e, sg(z_e)) + commitment * mean_i MSE(z_e, sg(e)). Muse masks the
packed sequence's last position out of both; here every image is whole, so nothing is masked.

KelixDetokenizer is the CPU stand-in for Kelix-DiT: fused patch vectors -> small bidirectional
transformer -> per-merged-patch pixels -> sigmoid image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError, DataError
from keel.model.attention import AttentionMask
from keel.model.backbone import RMSNorm, TransformerBlock, TransformerConfig, init_block

KEY = "model.tokenizer."


@dataclass
class KelixTokConfig:
    image_size: int = 28  # square images
    channels: int = 1  # 1: grey
    patch_size: int = 2  # ViT patch side in pixels
    merge: int = 2  # merge x merge neighbouring patches become one token (Keye: 2)
    vit_dim: int = 64  # ViT width
    vit_layers: int = 2  # bidirectional ViT blocks
    vit_heads: int = 4  # ViT attention heads
    n_q: int = 4  # sub-codebooks = codes per merged patch (paper: 8)
    codebook_size: int = 64  # K codes per sub-codebook (paper: 8192)
    code_dim: int = 32  # SimVQ projected code width (paper: 128)
    init_dim: int = 64  # width of the frozen codebook rows (paper: 4096)
    out_dim: int = 128  # fused vector width = the LLM width it feeds
    commitment: float = 0.25  # weight of MSE(z_e, sg(e))
    codebook_weight: float = 1.0  # weight of MSE(e, sg(z_e))
    decoder_dim: int = 64  # KelixDetokenizer width
    decoder_layers: int = 2  # KelixDetokenizer blocks
    init_std: float = 0.02  # normal init std of the linear layers

    @property
    def grid(self) -> int:
        """Merged patches per image side."""
        return self.image_size // (self.patch_size * self.merge)

    @property
    def num_patches(self) -> int:
        """Tokens per image (49 for the defaults)."""
        return self.grid ** 2

    def validate(self) -> None:
        for key in ("image_size", "channels", "patch_size", "merge", "vit_dim", "vit_layers", "vit_heads",
                    "code_dim", "init_dim", "out_dim", "decoder_dim", "decoder_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{KEY}{key}: must be > 0, got {getattr(self, key)}")
        side = self.patch_size * self.merge
        if self.image_size % side:
            raise ConfigError(f"{KEY}image_size: {self.image_size} is not divisible by patch_size*merge "
                              f"({self.patch_size}*{self.merge} = {side})")
        # Even head widths: the backbone's attention applies (identity) RoPE, which halves them.
        if self.vit_dim % self.vit_heads or (self.vit_dim // self.vit_heads) % 2:
            raise ConfigError(f"{KEY}vit_heads: {self.vit_heads} must divide vit_dim {self.vit_dim} into even head widths")
        if self.decoder_dim % 4 or (self.decoder_dim // 4) % 2:
            raise ConfigError(f"{KEY}decoder_dim: must be a multiple of 8 (4 heads of even width), got {self.decoder_dim}")
        if self.n_q < 1:
            raise ConfigError(f"{KEY}n_q: must be >= 1, got {self.n_q}")
        if self.codebook_size < 2:
            raise ConfigError(f"{KEY}codebook_size: must be >= 2, got {self.codebook_size}")
        if self.init_dim < self.code_dim:  # init_codebooks lifts code_dim centroids orthonormally
            raise ConfigError(f"{KEY}init_dim: must be >= code_dim {self.code_dim}, got {self.init_dim}")
        if self.commitment < 0 or self.codebook_weight < 0:
            raise ConfigError(f"{KEY}commitment: loss weights must be >= 0, got commitment={self.commitment}, "
                              f"codebook_weight={self.codebook_weight}")


@dataclass
class TokOutput:
    codes: torch.Tensor  # int64 [B, P, n_q]
    fused: torch.Tensor  # [B, P, out_dim], the sum of the up-projected quantised parts
    z_e: torch.Tensor  # [B, P, n_q, code_dim], LayerNormed pre-quantisation features (continuous baseline)
    loss: torch.Tensor  # codebook_weight * codebook_loss + commitment * commitment_loss
    codebook_loss: torch.Tensor  # mean over sub-codebooks of MSE(e, sg(z_e))
    commitment_loss: torch.Tensor  # mean over sub-codebooks of MSE(z_e, sg(e))


class BidirectionalStack(nn.Module):
    """Learned positions + backbone TransformerBlocks with a non-causal mask + final RMSNorm."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, seq_len: int, init_std: float):
        super().__init__()
        self.cfg = TransformerConfig(name="kelix_tok", vocab_size=1, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                     max_seq_len=seq_len, init_std=init_std)
        self.positions = nn.Parameter(torch.empty(seq_len, dim))
        self.layers = nn.ModuleList(TransformerBlock(self.cfg, i) for i in range(n_layers))
        self.norm = RMSNorm(dim, self.cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.positions, std=std)
        for block in self.layers:
            init_block(block, std, out_std)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.positions
        mask = AttentionMask(causal=False)
        mask.prepare(x.shape[1], x.shape[1], x.device)
        ones = x.new_ones(1, x.shape[1], self.cfg.head_dim, dtype=torch.float32)
        cos, sin = ones, torch.zeros_like(ones)  # identity RoPE
        for block in self.layers:
            x = block(x, cos, sin, mask)
        return self.norm(x)


class SubCodebook(nn.Module):
    """One SimVQ sub-codebook: frozen rows [K, init_dim] -> trainable proj -> LayerNorm = the codes."""

    def __init__(self, cfg: KelixTokConfig):
        super().__init__()
        self.register_buffer("codebook", torch.empty(cfg.codebook_size, cfg.init_dim))  # frozen, saved
        self.proj = nn.Linear(cfg.init_dim, cfg.code_dim)
        self.z_norm = nn.LayerNorm(cfg.code_dim)  # on the encoder's part
        self.q_norm = nn.LayerNorm(cfg.code_dim)  # on the projected codebook

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.codebook)
        # 1/sqrt(fan_in) keeps the projected codes near unit scale, where the LayerNorm is well behaved.
        nn.init.normal_(self.proj.weight, std=self.proj.in_features ** -0.5)
        nn.init.zeros_(self.proj.bias)
        self.z_norm.reset_parameters()
        self.q_norm.reset_parameters()

    def table(self) -> torch.Tensor:
        """The K codes [K, code_dim] as the quantiser compares them."""
        return self.q_norm(self.proj(self.codebook))

    def forward(self, part: torch.Tensor):
        """part [..., code_dim] -> (z_e, z_q, codes, codebook_loss, commitment_loss)."""
        z_e = self.z_norm(part)
        table = self.table()
        flat = z_e.reshape(-1, z_e.shape[-1])
        dist = flat.square().sum(1, keepdim=True) - 2 * flat @ table.T + table.square().sum(1)
        codes = dist.argmin(1).view(z_e.shape[:-1])
        e = table[codes]
        z_q = z_e + (e - z_e).detach()  # straight-through: the value is e, the gradient goes to z_e
        return z_e, z_q, codes, F.mse_loss(e, z_e.detach()), F.mse_loss(z_e, e.detach())


class KelixTokenizer(nn.Module):
    def __init__(self, cfg: KelixTokConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.vit_dim)
        self.vit = BidirectionalStack(cfg.vit_dim, cfg.vit_layers, cfg.vit_heads,
                                      (cfg.image_size // cfg.patch_size) ** 2, cfg.init_std)
        merged = cfg.vit_dim * cfg.merge ** 2
        self.merger = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, merged), nn.GELU(),
                                    nn.Linear(merged, cfg.out_dim))
        self.encoder = nn.Linear(cfg.out_dim, cfg.n_q * cfg.code_dim)
        self.quantizers = nn.ModuleList(SubCodebook(cfg) for _ in range(cfg.n_q))
        self.up_projs = nn.ModuleList(nn.Linear(cfg.code_dim, cfg.out_dim) for _ in range(cfg.n_q))
        self.init_weights()  # usable as built; keel's meta-device build calls it again after to_empty

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.init_std
        for lin in (self.patch_embed, self.merger[1], self.merger[3], self.encoder, *self.up_projs):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        self.merger[0].reset_parameters()
        self.vit.init_weights()
        for q in self.quantizers:
            q.init_weights()

    def _check(self, images: torch.Tensor) -> None:
        c, s = self.config.channels, self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s) or not images.is_floating_point():
            raise DataError(f"images: expected [B, {c}, {s}, {s}] floats in [0, 1], "
                            f"got {list(images.shape)} {images.dtype}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's parts before the quantisers' LayerNorm: [B, P, n_q, code_dim]."""
        self._check(images)
        cfg, b = self.config, images.shape[0]
        p, side = cfg.patch_size, cfg.image_size // cfg.patch_size
        x = images.reshape(b, cfg.channels, side, p, side, p).permute(0, 2, 4, 1, 3, 5)
        x = self.vit(self.patch_embed(x.reshape(b, side * side, -1) * 2 - 1))  # pixels centred on 0
        # 2x2 merge: the merge x merge neighbours of each merged cell, concatenated (row-major).
        m, g = cfg.merge, cfg.grid
        x = x.view(b, g, m, g, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
        return self.encoder(self.merger(x)).view(b, g * g, cfg.n_q, cfg.code_dim)

    def _fuse(self, z_q: torch.Tensor) -> torch.Tensor:
        return sum(up(z_q[..., i, :]) for i, up in enumerate(self.up_projs))

    def forward(self, images: torch.Tensor) -> TokOutput:
        parts = self.features(images)
        z_e, z_q, codes, cb, commit = zip(*(q(parts[..., i, :]) for i, q in enumerate(self.quantizers)))
        z_e, z_q, codes = torch.stack(z_e, -2), torch.stack(z_q, -2), torch.stack(codes, -1)
        cb, commit = torch.stack(cb).mean(), torch.stack(commit).mean()
        cfg = self.config
        return TokOutput(codes=codes, fused=self._fuse(z_q), z_e=z_e,
                         loss=cfg.codebook_weight * cb + cfg.commitment * commit,
                         codebook_loss=cb, commitment_loss=commit)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes int64 [B, P, n_q] (no autograd graph)."""
        parts = self.features(images)
        return torch.stack([q(parts[..., i, :])[2] for i, q in enumerate(self.quantizers)], dim=-1)

    def fuse_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., n_q] -> fused [..., out_dim]: the same value forward() gives for those codes."""
        if codes.shape[-1] != self.config.n_q:
            raise DataError(f"codes: expected [..., {self.config.n_q}], got {list(codes.shape)}")
        z_q = torch.stack([q.table()[codes[..., i]] for i, q in enumerate(self.quantizers)], dim=-2)
        return self._fuse(z_q)

    @torch.no_grad()
    def init_codebooks(self, images: torch.Tensor, iters: int = 20, seed: int = 0, chunk: int = 256) -> None:
        """K-means-initialise every sub-codebook on these images' features (muse's codebooks start
        from k-means too; random rows leave most codes unused).

        For sub-codebook i: C [K, code_dim] = k-means of its LayerNormed parts z_e. The frozen rows
        live in init_dim, so they are lifted with a seeded random Q [init_dim, code_dim] with
        orthonormal columns: codebook = n(C) @ Q^T, proj.weight = Q^T, proj.bias = 0, hence
        proj(codebook) = n(C) exactly. n(.) undoes q_norm's affine and re-standardises each row (a
        centroid of unit-variance rows is shorter than they are; LayerNorm would rescale it anyway),
        so q_norm(proj(codebook)) = q_norm's affine of the standardised centroid: C's direction."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        parts = torch.cat([self.features(images[s:s + chunk]) for s in range(0, len(images), chunk)])
        cfg = self.config
        for i, q in enumerate(self.quantizers):
            z = q.z_norm(parts[..., i, :]).reshape(-1, cfg.code_dim).float().cpu()
            c = kmeans(z, cfg.codebook_size, iters, gen)
            c = (c - q.q_norm.bias.float().cpu()) / q.q_norm.weight.float().cpu().clamp(min=1e-6)
            c = F.layer_norm(c, (cfg.code_dim,), eps=q.q_norm.eps)
            basis, _ = torch.linalg.qr(torch.randn(cfg.init_dim, cfg.code_dim, generator=gen))
            q.codebook.copy_((c @ basis.T).to(q.codebook))
            q.proj.weight.copy_(basis.T.to(q.proj.weight))
            q.proj.bias.zero_()


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of x [N, D] -> centroids [k, D], from k distinct seeded rows. A cluster
    left empty takes the point worst served by its centroid, so every code starts in use."""
    if len(x) < k:
        raise DataError(f"init_codebooks: {len(x)} feature vectors for {k} codes; pass more images")
    c = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        dist = torch.cdist(x, c)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = dist.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
            c[empty] = x[worst]
    return c


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Per sub-codebook of codes [..., n_q]: "usage", the fraction of the K codes used at least once,
    and "perplexity", exp of the entropy of the code histogram (K when uniform, 1 when collapsed)."""
    flat = codes.reshape(-1, codes.shape[-1])
    return usage_from_counts(torch.stack([torch.bincount(flat[:, i], minlength=codebook_size)
                                          for i in range(flat.shape[1])]))


def usage_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """codebook_usage from a code histogram [n_q, K] (summed over batches and ranks by the trainer)."""
    counts = counts.double()
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    entropy = -(p * p.clamp(min=1e-300).log()).sum(1)  # 0 log 0 = 0
    return {"usage": (counts > 0).double().mean(1), "perplexity": entropy.exp()}


class KelixDetokenizer(nn.Module):
    """Fused patch vectors [B, P, out_dim] -> images [B, channels, H, W] in (0, 1)."""

    def __init__(self, cfg: KelixTokConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        side = cfg.patch_size * cfg.merge
        self.inp = nn.Linear(cfg.out_dim, cfg.decoder_dim)
        self.stack = BidirectionalStack(cfg.decoder_dim, cfg.decoder_layers, 4, cfg.num_patches, cfg.init_std)
        self.out = nn.Linear(cfg.decoder_dim, cfg.channels * side * side)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in (self.inp, self.out):
            nn.init.normal_(lin.weight, std=self.config.init_std)
            nn.init.zeros_(lin.bias)
        self.stack.init_weights()

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        cfg, b = self.config, fused.shape[0]
        if fused.ndim != 3 or tuple(fused.shape[1:]) != (cfg.num_patches, cfg.out_dim):
            raise DataError(f"fused: expected [B, {cfg.num_patches}, {cfg.out_dim}], got {list(fused.shape)}")
        x = self.out(self.stack(self.inp(fused)))  # [B, P, C * side * side]
        g, side = cfg.grid, cfg.patch_size * cfg.merge
        x = x.view(b, g, g, cfg.channels, side, side).permute(0, 3, 1, 4, 2, 5)
        return torch.sigmoid(x.reshape(b, cfg.channels, cfg.image_size, cfg.image_size))

    def reconstruction_loss(self, fused: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Pixel MSE of the decoded fused vectors against the images they came from."""
        return F.mse_loss(self(fused), images)
