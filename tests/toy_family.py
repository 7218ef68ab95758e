"""A family defined outside keel, registered as a plugin: a character bigram model of the real KJV text.

Nothing in keel/ knows it. A recipe lists this file under `plugins:`; the spec brings its own config
class, builder, training task (data, loss, an accuracy metric) and no decoding or HF adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.data.assets import corpus_files
from keel.errors import ConfigError
from keel.model.registry import ModelSpec, register_model
from keel.model.task import TrainingTask

ALPHABET = 128  # ASCII; anything else maps to 0


@dataclass
class CharBigramConfig:
    name: str = "char_bigram"
    alphabet: int = ALPHABET  # characters modelled
    init_std: float = 0.02  # std of the initial logit table
    init_from: Optional[str] = None

    def validate(self) -> None:
        if self.alphabet != ALPHABET:
            raise ConfigError(f"model.alphabet: only {ALPHABET} is supported, got {self.alphabet}")


class CharBigram(nn.Module):
    def __init__(self, cfg: CharBigramConfig):
        super().__init__()
        self.config = cfg
        self.logits = nn.Parameter(torch.empty(cfg.alphabet, cfg.alphabet))

    def init_weights(self) -> None:
        nn.init.normal_(self.logits, std=self.config.init_std)

    def init_buffers(self) -> None:
        pass

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        # A one-hot matmul rather than indexing: indexing's backward adds rows in a thread-dependent
        # order on CPU, and this test checks that a resumed run ends on bit-identical weights.
        return F.one_hot(chars, self.config.alphabet).to(self.logits.dtype) @ self.logits


def kjv_codes() -> torch.Tensor:
    text = "\n".join(p.read_text(encoding="utf-8") for p in corpus_files("kjv")[:3])
    return torch.tensor([b if b < ALPHABET else 0 for b in text.encode("ascii", "replace")], dtype=torch.long)


class BigramData:
    """Windows of the text; the last 10% held out. The position (windows consumed) is the only state."""

    def __init__(self, codes: torch.Tensor, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int):
        n_eval = len(codes) // 10
        self.train_codes, self.eval_codes = codes[:-n_eval], codes[-n_eval:]
        self.seq_len, self.global_batch, self.micro = seq_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.position = dp_rank, dp_size, 0

    def _window(self, codes: torch.Tensor, index: int) -> dict:
        start = (index * 7919 * self.seq_len) % (len(codes) - self.seq_len - 1)
        piece = codes[start:start + self.seq_len + 1]
        return {"chars": piece[:-1], "next": piece[1:]}

    def _batch(self, codes, indices) -> dict:
        rows = [self._window(codes, i) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def next_step(self) -> list[dict]:
        per_rank = self.global_batch // self.dp_size
        first = self.position + self.dp_rank * per_rank
        self.position += self.global_batch
        return [self._batch(self.train_codes, range(first + i, first + i + self.micro))
                for i in range(0, per_rank, self.micro)]

    def eval_batches(self, n: int, micro: int, dp_rank: int, dp_size: int) -> list[dict]:
        base = dp_rank * n * micro
        return [self._batch(self.eval_codes, range(base + j * micro, base + (j + 1) * micro)) for j in range(n)]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class BigramTask(TrainingTask):
    def build_data(self, *, dp_rank: int, dp_size: int):
        t = self.cfg.train
        return BigramData(kjv_codes(), self.cfg.data.seq_len, t.global_batch, t.micro_batch, dp_rank, dp_size)

    def loss_sum(self, model, batch):
        logits = model(batch["chars"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["next"].reshape(-1), reduction="sum")

    def units(self, batch):
        return torch.tensor(batch["next"].numel(), dtype=torch.int64)

    def fingerprint(self, batch):
        return batch["chars"].sum()

    def eval_sums(self, model, batch):
        correct = (model(batch["chars"]).argmax(-1) == batch["next"]).sum()
        return {**super().eval_sums(model, batch), "correct": correct.float()}

    def eval_metrics(self, sums):
        return {"eval_loss": sums["loss"] / sums["units"], "eval_accuracy": sums["correct"] / sums["units"]}


register_model(ModelSpec("char_bigram", CharBigramConfig, CharBigram, BigramTask,
                         "character bigram model (a test plugin)", model_parallel=()))
