"""The Kelix family's training task: captioned Fashion-MNIST as block sequences (keel/model/kelix.py).

A sample is one image and one caption (a template over its class name, keel/data/fashion_mnist.py),
in one of two orders drawn per sample (images.generation_share):
  understanding  [bos] [boi] P patch blocks [eoi] caption words [eos]
  generation     [bos] caption words [boi] P patch blocks [eoi] [eos]
rows padded with PAD blocks to one length. Every real block after [bos] is predicted (the unified
objective); the tokenizer stage predicts only text blocks (kelix.py). The caption vocabulary is
word-level: the special tokens, then every word of every template (lower case), in sorted order.

A loss unit is one target sub-token (a text block is 2: its word and q_eos; a patch block n_q + 1);
the detokenizer stage's unit is one pixel. Evaluation adds, on images.eval_images test images:
eval_class_acc (the class whose caption "a <name>" the model finds likeliest after the image, as an
understanding score), codebook usage (eval_usage_min: the least-used sub-codebook's share of codes
in use; eval_perplexity_mean) and eval_recon_mse (the detokenizer's pixel MSE from the codes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from keel.data.fashion_mnist import CLASS_NAMES, captions_for, load_fashion_mnist
from keel.data.loader import TrainData
from keel.data.sampler import GlobalBatchSampler
from keel.errors import ConfigError
from keel.model.kelix import image_positions, text_subtokens
from keel.model.kelix_tok import usage_from_counts
from keel.model.kelix_vocab import BOI, BOS, EOI, EOS, PAD, Q_EOS, CaptionVocab
from keel.model.task import TrainingTask


def _draw(seed: int, index: int, salt: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, index, salt): resumes see the same samples."""
    digest = hashlib.sha256(f"{seed}:{index}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


class CaptionedImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, vocab: CaptionVocab, patches: int, width: int,
                 generation_share: float, seed: int, fixed_caption: bool = False):
        self.images, self.labels, self.vocab = images, labels, vocab
        self.patches, self.width, self.share, self.seed = patches, width, generation_share, seed
        self.fixed_caption = fixed_caption  # eval: "a <name>", understanding order
        self.captions = [[vocab.encode(t) for t in captions_for(c)] for c in range(len(CLASS_NAMES))]
        self.max_words = max(len(c) for per_class in self.captions for c in per_class)
        self.length = 4 + patches + self.max_words  # bos, boi, eoi, eos
        if fixed_caption:  # every class's "a <name>" + [eos], PAD-padded: what eval scores the image against
            self.class_captions = torch.full((len(CLASS_NAMES), self.max_words + 1), PAD, dtype=torch.long)
            for c, per_class in enumerate(self.captions):
                self.class_captions[c, :len(per_class[0]) + 1] = torch.tensor(per_class[0] + [EOS])

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, i: int) -> list[int]:
        options = self.captions[int(self.labels[i])]
        return options[0] if self.fixed_caption else options[int(_draw(self.seed, i, "caption") * len(options))]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generation = not self.fixed_caption and _draw(self.seed, i, "order") < self.share
        return self.sample(i, self.caption(i), generation)

    def sample(self, i: int, words: list[int], generation: bool) -> dict[str, torch.Tensor]:
        blocks = torch.full((self.length, self.width), PAD, dtype=torch.long)
        image_slot = [None] * self.patches  # filled by the model from the tokenizer's codes
        text = lambda ids: list(ids)  # noqa: E731
        order = ([BOS, *text(words), BOI, *image_slot, EOI, EOS] if generation
                 else [BOS, BOI, *image_slot, EOI, *text(words), EOS])
        for t, token in enumerate(order):
            if token is not None:
                blocks[t, 0], blocks[t, 1] = token, Q_EOS
        loss = torch.zeros(self.length, dtype=torch.bool)
        loss[1:len(order)] = True
        start = order.index(BOI) + 1
        out = {"blocks": blocks, "image_start": torch.tensor(start), "loss_blocks": loss,
               "images": self.images[i].float()[None] / 255.0, "labels": self.labels[i].clone()}
        if self.fixed_caption:
            out["class_captions"] = self.class_captions
        return out


class KelixTask(TrainingTask):
    unit_name = "subtok"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.images is None:
            raise ConfigError("images: the kelix family trains on captioned images; add an images: section "
                              "(see recipes/kelix/)")
        self.vocab = CaptionVocab.from_templates()

    def prepare(self) -> None:
        model = self.cfg.model
        if model.stage == "tokenizer" and self.cfg.images.generation_share > 0:
            raise ConfigError("images.generation_share: the tokenizer stage learns from captions of images, "
                              "so it must be 0 (caption -> image samples teach it nothing)")

    def on_fresh_start(self, model) -> None:
        """The tokenizer stage's frozen codebooks start as k-means centroids of the (random) ViT's
        features of the first model.codebook_init_images training images, as Kelix's do: random rows
        leave most codes unused. The same images on every rank, so every rank gets the same codebooks."""
        count = self.cfg.model.codebook_init_images
        if self.cfg.model.stage != "tokenizer" or count == 0:
            return
        tokenizer = getattr(model, "module", model).tokenizer  # DDP wraps the model
        if any(type(p).__name__ == "DTensor" for p in tokenizer.parameters()):
            raise ConfigError("model.codebook_init_images: k-means codebook init runs on one process or DDP, "
                              "not on sharded parameters; set it to 0 or train the tokenizer stage without FSDP")
        images, _ = load_fashion_mnist("train")
        device = next(tokenizer.parameters()).device
        tokenizer.init_codebooks(images[:count].float()[:, None].to(device) / 255.0, seed=self.cfg.train.seed)

    def save_assets(self, run_dir: Path) -> None:
        (Path(run_dir) / "caption_vocab.json").write_text(json.dumps(self.vocab.words))

    def dataset(self, split: str, fixed_caption: bool = False) -> CaptionedImages:
        images, labels = load_fashion_mnist(split)
        cfg = self.cfg.images
        if split == "train" and cfg.train_images:
            images, labels = images[:cfg.train_images], labels[:cfg.train_images]
        elif split == "test":  # spread over the split (it is ordered by nothing, but do not rely on it)
            chosen = torch.arange(cfg.eval_images) * len(labels) // cfg.eval_images
            images, labels = images[chosen], labels[chosen]
        tok = self.cfg.model.tokenizer
        return CaptionedImages(images, labels, self.vocab, tok.num_patches, tok.n_q + 1, cfg.generation_share,
                               self.cfg.train.seed, fixed_caption)

    def build_data(self, *, dp_rank: int, dp_size: int):
        train, t = self.dataset("train"), self.cfg.train
        sampler = GlobalBatchSampler(len(train), t.global_batch, t.micro_batch, dp_rank, dp_size, t.seed)
        return TrainData(train, self.dataset("test", fixed_caption=True), sampler, ["fashion-mnist"])

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return model(batch)

    def units(self, batch: dict) -> torch.Tensor:
        stage, blocks = self.cfg.model.stage, batch["blocks"]
        if stage == "detokenizer":
            return torch.tensor(batch["images"][:, 0].numel())
        text = text_subtokens(blocks, batch["loss_blocks"])
        if stage == "tokenizer":
            return text
        tok = self.cfg.model.tokenizer  # each predicted patch block: n_q codes + q_eos
        on_image = image_positions(blocks, batch["image_start"], tok.num_patches)
        return text + (on_image[:, 1:] & batch["loss_blocks"][:, 1:]).sum() * (tok.n_q + 1)

    def fingerprint(self, batch: dict) -> torch.Tensor:
        return batch["blocks"].sum() + batch["labels"].sum()

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        """Shapes only (keel plan traces it under fake tensors, where no value can be read)."""
        tok = self.cfg.model.tokenizer
        words = max(len(c.split()) for k in range(len(CLASS_NAMES)) for c in captions_for(k))
        length = 4 + tok.num_patches + words
        return {"blocks": torch.zeros(rows, length, tok.n_q + 1, dtype=torch.long),
                "image_start": torch.full((rows,), 2, dtype=torch.long),
                "loss_blocks": torch.ones(rows, length, dtype=torch.bool),
                "images": torch.zeros(rows, tok.channels, tok.image_size, tok.image_size),
                "labels": torch.zeros(rows, dtype=torch.long)}

    def sample_shape(self) -> str:
        tok = self.cfg.model.tokenizer
        return f"1 image ({tok.num_patches} patch blocks of {tok.n_q} codes) + 1 caption"

    def next_steps(self, run_dir: str) -> str:
        return f"keel plot {run_dir} --metric eval_class_acc"

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        sums = super().eval_sums(model, batch)
        with torch.no_grad():
            out = model(batch, what="eval")
        scores = out["class_scores"]  # [B, classes]
        sums["class_hits"] = (scores.argmax(-1) == batch["labels"]).float().sum().cpu()
        sums["images"] = torch.tensor(float(len(batch["labels"])))
        sums["recon_mse"] = out["recon_mse"].cpu() * len(batch["labels"])
        # Code counts as scalars (the trainer sums scalars over batches and ranks): usage is over the
        # whole eval set, not per batch.
        tok = self.cfg.model.tokenizer
        codes = out["codes"].flatten(0, 1) + tok.codebook_size * torch.arange(tok.n_q, device=out["codes"].device)
        counts = torch.bincount(codes.flatten(), minlength=tok.n_q * tok.codebook_size).cpu()
        sums.update({f"code_count/{j}": counts[j] for j in range(len(counts))})
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        out = super().eval_metrics(sums)
        n = max(sums["images"], 1)
        tok = self.cfg.model.tokenizer
        counts = torch.tensor([sums[f"code_count/{j}"] for j in range(tok.n_q * tok.codebook_size)])
        usage = usage_from_counts(counts.view(tok.n_q, tok.codebook_size))
        out.update({"eval_class_acc": sums["class_hits"] / n, "eval_recon_mse": sums["recon_mse"] / n,
                    "eval_usage_min": float(usage["usage"].min()),
                    "eval_perplexity_mean": float(usage["perplexity"].mean())})
        return out

