"""Kelix: a fully discrete unified multimodal model on the backbone. Single-device code.

Three parts, one module tree (so each training stage is a plain `keel train` that starts from the
previous stage's run with `model.init_from`):
  tokenizer    Kelix-Tok (keel/model/kelix_tok.py): a ViT + n_q sub-codebooks; each merged image patch
               becomes n_q codes
  LLM          the backbone with its vocabulary extended by n_q x K visual ids (sub-codebook i's code c
               is id text_vocab + i*K + c); one LLM position per block, embedded as the sum of the
               embeddings of its sub-ids, and the next-block-prediction head (keel/model/kelix_head.py)
  detokenizer  a small pixel decoder from the codes, the CPU stand-in for Kelix's DiT

A batch holds blocks [B, L, W] (W = n_q + 1): a text block is [token, q_eos, pad...]; the image's P
patch blocks are left as pad and filled here from the tokenizer's codes ([c_0+off_0, ..., q_eos]);
`image_start` [B] says where they begin, `loss_blocks` [B, L] which blocks are predicted.

model.stage picks what trains and on what (STAGES):
  tokenizer    the tokenizer, LLM and detokenizer, end to end: image positions get the tokenizer's
               fused (straight-through) vectors; loss = caption NBP loss + VQ losses + reconstruction
  unified      the LLM and head on discrete ids, tokenizer and detokenizer frozen: every block predicted
  detokenizer  only the pixel decoder, from the frozen tokenizer's codes
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.backbone import Transformer, TransformerConfig
from keel.model.kelix_head import NBPConfig, NextBlockHead, generate_block, teacher_forced_loss
from keel.model.kelix_tok import KelixDetokenizer, KelixTokConfig, KelixTokenizer
from keel.model.kelix_vocab import BOS, PAD, Q_EOS, CaptionVocab
from keel.model.loss import IGNORE_INDEX



@dataclass
class KelixConfig(TransformerConfig):
    name: str = "kelix"
    vocab_size: int = 0  # filled: text_vocab + n_q * codebook_size
    text_vocab: int = 0  # 0: the caption vocabulary's size (specials + words, keel/model/kelix_vocab.py)
    stage: Literal["tokenizer", "unified", "detokenizer"] = "unified"  # what trains: STAGES below
    tokenizer: KelixTokConfig = field(default_factory=KelixTokConfig)
    nbp: NBPConfig = field(default_factory=NBPConfig)
    recon_weight: float = 1.0  # stage tokenizer: weight of the detokenizer's pixel MSE in the loss
    # stage unified: weight of an image patch's sub-tokens against a caption's (the paper does not give
    # it). 49 patches x (n_q + 1) sub-tokens outweigh a caption's ~12 about 20 to 1 at 1.0.
    image_loss_weight: float = 1.0
    codebook_init_images: int = 2048  # stage tokenizer from scratch: k-means the codebooks on this many images (0: random)

    def __post_init__(self):
        super().__post_init__()
        self.fill_vocab()

    def fill_vocab(self) -> None:
        captions = len(CaptionVocab.from_templates())
        if self.text_vocab not in (0, captions):
            raise ConfigError(f"model.text_vocab: {self.text_vocab} is not the caption vocabulary's size "
                              f"({captions}); remove it (it is filled from the captions)")
        self.text_vocab = captions
        self.vocab_size = self.text_vocab + self.tokenizer.n_q * self.tokenizer.codebook_size

    @property
    def block_width(self) -> int:
        return self.tokenizer.n_q + 1

    def validate(self) -> None:
        self.fill_vocab()
        super().validate()
        self.tokenizer.validate()
        if self.tokenizer.out_dim != self.dim:
            raise ConfigError(f"model.tokenizer.out_dim: {self.tokenizer.out_dim} must equal model.dim "
                              f"{self.dim} (a fused patch vector is an LLM input embedding)")
        if self.stage not in STAGES:
            raise ConfigError(f"model.stage: unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        if self.image_loss_weight < 0:
            raise ConfigError(f"model.image_loss_weight: must be >= 0, got {self.image_loss_weight}")
        if self.nbp.dim % self.nbp.heads:
            raise ConfigError(f"model.nbp.heads: {self.nbp.heads} does not divide model.nbp.dim {self.nbp.dim}")


# Which submodules train in each stage (the others are frozen: keel/train/optim.py skips them).
STAGES = {
    "tokenizer": ("tokenizer", "detokenizer", "tok_embeddings", "layers", "norm", "output", "head"),
    "unified": ("tok_embeddings", "layers", "norm", "output", "head"),
    "detokenizer": ("detokenizer",),
}


class KelixModel(Transformer):
    def __init__(self, cfg: KelixConfig):
        super().__init__(cfg)
        self.tokenizer = KelixTokenizer(cfg.tokenizer)
        self.detokenizer = KelixDetokenizer(cfg.tokenizer)
        self.head = NextBlockHead(cfg.dim, cfg.block_width, cfg.nbp, cfg.norm_eps)
        self.register_buffer("code_offsets", torch.empty(cfg.tokenizer.n_q, dtype=torch.long), persistent=False)
        trained = STAGES[cfg.stage]
        for name, param in self.named_parameters():
            param.requires_grad_(name.split(".", 1)[0] in trained)

    @torch.no_grad()
    def init_buffers(self) -> None:
        super().init_buffers()
        self.head.init_buffers()  # a loaded model gets its buffers here, not from init_weights
        tok = self.config.tokenizer
        self.code_offsets.copy_(self.config.text_vocab + tok.codebook_size * torch.arange(tok.n_q))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.init_buffers()
        self.tokenizer.init_weights()
        self.detokenizer.init_weights()
        self.head.init_weights(self.config.init_std)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout, no state updates) whatever the trainer asks."""
        super().train(mode)
        trained = STAGES[self.config.stage]
        for name in ("tokenizer", "detokenizer"):
            if name not in trained:
                getattr(self, name).eval()
        return self

    # ------------------------------------------------------------ blocks
    def visual_blocks(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, P, n_q] -> image blocks [B, P, W]: each sub-code at its sub-codebook's offset, then q_eos."""
        ids = codes + self.code_offsets
        return torch.cat([ids, torch.full_like(ids[..., :1], Q_EOS)], dim=-1)

    def with_image(self, blocks: torch.Tensor, image_start: torch.Tensor, image_blocks: torch.Tensor) -> torch.Tensor:
        """blocks with each row's image blocks written from image_start on."""
        patches = image_blocks.shape[1]
        index = (image_start[:, None] + torch.arange(patches, device=blocks.device))[..., None]
        return blocks.scatter(1, index.expand_as(image_blocks), image_blocks)

    def embed_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The LLM input of each block: the sum of the embeddings of its sub-ids before q_eos. A text
        block [t, q_eos, pad...] is therefore exactly the LM's embedding of t."""
        keep = (blocks != PAD) & (blocks != Q_EOS)
        return (self.tok_embeddings(blocks) * keep[..., None].to(self.tok_embeddings.weight.dtype)).sum(-2)

    def image_positions(self, blocks: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor:
        return image_positions(blocks, image_start, self.config.tokenizer.num_patches)

    # ------------------------------------------------------------ losses
    def nbp_loss(self, h: torch.Tensor, blocks: torch.Tensor, predict: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        """Summed teacher-forced loss of block t+1 from h_t wherever predict[:, t+1] holds (times
        weight[:, t+1] when given)."""
        # Every row goes through the head, unpredicted ones with ignored targets: no data-dependent
        # shape (keel plan traces this under fake tensors; torch.compile would break the graph).
        ignored = (blocks[:, 1:] == PAD) | ~predict[:, 1:, None]
        targets = blocks[:, 1:].masked_fill(ignored, IGNORE_INDEX)
        return teacher_forced_loss(self.head, self.tok_embeddings, self.head_weight(), h[:, :-1].flatten(0, 1),
                                   targets.flatten(0, 1), row_weight=None if weight is None else weight[:, 1:].flatten())

    def inputs(self, batch: dict, blocks: torch.Tensor | None = None):
        """(LLM inputs [B, L, dim], blocks with the image filled in, the tokenizer's output or None).
        The tokenizer stage feeds the fused straight-through vectors (so the LM loss trains the
        tokenizer); the others feed the discrete codes' summed embeddings, tokenizer frozen."""
        blocks = batch["blocks"] if blocks is None else blocks
        if self.config.stage == "tokenizer":
            tok = self.tokenizer(batch["images"])
            on_image = self.image_positions(blocks, batch["image_start"])
            blocks = self.with_image(blocks, batch["image_start"], self.visual_blocks(tok.codes))
            x = self.embed_blocks(blocks).masked_scatter(on_image[..., None], tok.fused.to(self.head_weight().dtype))
            return x, blocks, tok
        with torch.no_grad():
            codes = self.tokenizer.encode(batch["images"])
        blocks = self.with_image(blocks, batch["image_start"], self.visual_blocks(codes))
        return self.embed_blocks(blocks), blocks, None

    def forward(self, batch: dict, what: str = "loss"):
        """The stage's summed loss; what="eval": class scores, codes and reconstruction error."""
        if what == "eval":
            return self.evaluate_batch(batch)
        return STAGE_LOSS[self.config.stage](self, batch)

    def tokenizer_stage_loss(self, batch: dict) -> torch.Tensor:
        x, blocks, tok = self.inputs(batch)
        # Captions train the tokenizer through the LLM; the image's own blocks are not targets here.
        predict = batch["loss_blocks"] & ~self.image_positions(blocks, batch["image_start"])
        loss = self.nbp_loss(self.hidden_states(x), blocks, predict)
        units = text_subtokens(blocks, predict)
        recon = self.detokenizer.reconstruction_loss(tok.fused, batch["images"])
        return loss + units * (tok.loss + self.config.recon_weight * recon)

    def unified_stage_loss(self, batch: dict) -> torch.Tensor:
        x, blocks, _ = self.inputs(batch)
        weight = None
        if self.config.image_loss_weight != 1.0:
            on_image = self.image_positions(blocks, batch["image_start"])
            weight = torch.where(on_image, self.config.image_loss_weight, 1.0).to(x.dtype)
        return self.nbp_loss(self.hidden_states(x), blocks, batch["loss_blocks"], weight)

    def detokenizer_stage_loss(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            fused = self.tokenizer.fuse_codes(self.tokenizer.encode(batch["images"]))
        return self.detokenizer.reconstruction_loss(fused, batch["images"]) * batch["images"][:, 0].numel()

    @torch.no_grad()
    def evaluate_batch(self, batch: dict) -> dict:
        """class_scores [B, C]: log p(caption of class c + [eos] | [bos][boi] image [eoi]) for each class's
        caption in batch["class_captions"] [B, C, Lc] (PAD-padded); codes [B, P, n_q]; recon_mse."""
        codes = self.tokenizer.encode(batch["images"])
        recon = self.detokenizer.reconstruction_loss(self.tokenizer.fuse_codes(codes), batch["images"])
        captions = batch["class_captions"]
        start = batch["image_start"] + self.config.tokenizer.num_patches + 1  # after [eoi]
        width = captions.shape[-1]
        index = (start[:, None] + torch.arange(width, device=start.device))
        scores = []
        prefix = batch["blocks"].masked_fill(  # [bos][boi] image [eoi], nothing after
            (torch.arange(batch["blocks"].shape[1], device=start.device) >= start[:, None])[..., None], PAD)
        for c in range(captions.shape[1]):
            blocks = prefix.clone()
            words = captions[:, c]
            text = torch.stack([words, torch.where(words == PAD, PAD, Q_EOS)], -1)
            blocks[..., :2] = blocks[..., :2].scatter(1, index[..., None].expand(-1, -1, 2), text)
            x, blocks, _ = self.inputs(batch, blocks)
            h = self.hidden_states(x)
            prev = h.gather(1, (index - 1)[..., None].expand(-1, -1, h.shape[-1]))
            target = blocks.gather(1, index[..., None].expand(-1, -1, blocks.shape[-1]))
            logp = self.block_logprob(prev.flatten(0, 1), target.flatten(0, 1)).view(words.shape)
            scores.append((logp * (words != PAD)).sum(-1))
        return {"class_scores": torch.stack(scores, -1), "codes": codes, "recon_mse": recon.detach()}

    # ------------------------------------------------------------ generation
    def allowed_subtokens(self, kind: str) -> torch.Tensor:
        """[W, V] bool: the ids sub-token j of a text or image block may take."""
        cfg, tok = self.config, self.config.tokenizer
        allowed = torch.zeros(cfg.block_width, cfg.vocab_size, dtype=torch.bool, device=self.code_offsets.device)
        if kind == "text":
            allowed[0, BOS + 1:cfg.text_vocab] = True
            allowed[0, Q_EOS] = False
            allowed[1:, Q_EOS] = True
        else:
            for i, offset in enumerate(self.code_offsets.tolist()):
                allowed[i, offset:offset + tok.codebook_size] = True
            allowed[tok.n_q, Q_EOS] = True
        return allowed

    @torch.no_grad()
    def continue_blocks(self, blocks: torch.Tensor, kinds: list[str], temperature: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Append one block per entry of kinds ("text" or "image") to blocks [B, L, W], each drawn by
        the NBP head from the LLM state of the last position (recomputed over the whole prefix: the
        sequences here are short; a KV cache is a later optimisation)."""
        allowed = {kind: self.allowed_subtokens(kind) for kind in set(kinds)}
        for kind in kinds:
            h = self.hidden_states(self.embed_blocks(blocks))[:, -1]
            block = generate_block(self.head, self.tok_embeddings, self.head_weight(), h, allowed[kind], Q_EOS,
                                   temperature, generator)
            blocks = torch.cat([blocks, text_blocks_pad(block, self.config.block_width)[:, None]], dim=1)
        return blocks

    def block_logprob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target block | h) per row: h [N, dim], target [N, W] (PAD after q_eos)."""
        targets = target.masked_fill(target == PAD, IGNORE_INDEX)
        out = self.head(h, self.tok_embeddings(target[:, :-1]))
        logp = F.log_softmax(F.linear(out, self.head_weight()).float(), -1)
        picked = logp.gather(-1, target[..., None])[..., 0]
        return (picked * (targets != IGNORE_INDEX)).sum(-1)


def image_positions(blocks: torch.Tensor, image_start: torch.Tensor, patches: int) -> torch.Tensor:
    """[B, L] bool: the positions of each row's image patch blocks."""
    col = torch.arange(blocks.shape[1], device=blocks.device)
    return (col >= image_start[:, None]) & (col < image_start[:, None] + patches)


def text_subtokens(blocks: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """Target sub-tokens of the predicted blocks whose sub-ids are in `blocks` (the image's are PAD
    until the model fills them in)."""
    return ((blocks[:, 1:] != PAD) & predict[:, 1:, None]).sum()


def text_blocks_pad(block: torch.Tensor, width: int) -> torch.Tensor:
    """A generated block with everything after its first q_eos set to PAD (the stored layout)."""
    after = (block == Q_EOS).long().cumsum(-1) - (block == Q_EOS).long()
    return block.masked_fill(after > 0, PAD)[:, :width]


STAGE_LOSS = {
    "tokenizer": KelixModel.tokenizer_stage_loss,
    "unified": KelixModel.unified_stage_loss,
    "detokenizer": KelixModel.detokenizer_stage_loss,
}


def build_kelix(cfg: KelixConfig) -> KelixModel:
    return KelixModel(cfg)
