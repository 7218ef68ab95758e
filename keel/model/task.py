"""Training tasks: what a family trains on, its loss and its eval metrics.

The trainer knows nothing of tokens, labels or documents. Per step it asks the family's task for
this rank's micro-batches, sums `loss_sum(model, batch)` over them, and normalises by the number of
loss units (`units`, summed over every rank), so any split over ranks and micro-batches gives the
same update. A family registers a task factory (`ModelSpec.task`: Config -> TrainingTask).

`LanguageModelTask` is the next-token task of the LM and KSA families: packed documents or SFT
records from `data:`, tokenized by `data.tokenizer`, loss summed over tokens that carry a label.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from keel.data.assets import keel_home
from keel.data.loader import build_train_data
from keel.data.tokenizer import Tokenizer
from keel.errors import ConfigError
from keel.model.loss import IGNORE_INDEX


class TrainingTask:
    """The interface the trainer drives. Batches are dicts of tensors; the data object returned by
    `build_data` has next_step() -> [micro-batch], eval_batches(n, micro, dp_rank, dp_size),
    state_dict() and load_state_dict() (its position: a global sample index, so it reshards)."""
    unit_name = "tok"  # a loss unit in the progress line's throughput (`8.1k tok/s`)

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self) -> None:
        """Load and check what the task needs (a tokenizer, ...) before anything is written."""

    def save_assets(self, run_dir: Path) -> None:
        """Files a run directory keeps beside its checkpoints (e.g. tokenizer/)."""

    def on_fresh_start(self, model: torch.nn.Module) -> None:
        """Called once when a run starts from step 0 with freshly initialised weights (not on resume,
        not with model.init_from), on every rank: data-dependent initialisation (k-means codebooks).
        Must compute the same on every rank."""

    def build_data(self, *, dp_rank: int, dp_size: int):
        raise NotImplementedError

    def loss_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The loss summed (not averaged) over the batch's loss units."""
        raise NotImplementedError

    def units(self, batch: dict) -> torch.Tensor:
        """How many loss units (tokens, samples) the batch holds, as an int64 tensor."""
        raise NotImplementedError

    def fingerprint(self, batch: dict) -> torch.Tensor:
        """A checksum of the batch's content, logged so a resumed run shows it saw the same data."""
        return torch.zeros((), dtype=torch.int64)

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        """A micro-batch of `rows` samples with the task's shapes (zeros), for `keel plan`'s trace;
        under context parallelism, this rank's share of each sequence."""
        raise NotImplementedError(f"{type(self).__name__} has no fake batch for keel plan")

    def sample_shape(self) -> str:
        """One sample's size in words, for keel plan's summary (e.g. "seq_len 4096")."""
        return "1 sample"

    def step_size(self, global_batch: int) -> str:
        """What one optimizer step consumes, for the start banner."""
        return f"{global_batch} samples/step ({self.sample_shape()})"

    def next_steps(self, run_dir: str) -> str:
        """The commands a user runs on a finished run."""
        return f"keel plot {run_dir} --metric loss"

    def eval_sums(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Quantities summed over eval batches and ranks, then turned into metrics by eval_metrics."""
        return {"loss": self.loss_sum(model, batch).float(), "units": self.units(batch).float()}

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        return {"eval_loss": sums["loss"] / max(sums["units"], 1)}


class LanguageModelTask(TrainingTask):
    tokenizer: Optional[Tokenizer] = None

    def prepare(self) -> None:
        self.tokenizer = Tokenizer.load(self.cfg.data.tokenizer)
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {self.cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size}, data.tokenizer)")

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / "tokenizer")

    def build_data(self, *, dp_rank: int, dp_size: int):
        cfg = self.cfg
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else keel_home() / "data"
        return build_train_data(cfg.data, self.tokenizer, global_batch=cfg.train.global_batch,
                                micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                                seed=cfg.train.seed, cache_dir=cache)

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        # data.document_mask false: a packed row is one sequence, so the attention is plain causal
        # (flash on GPU) rather than a document mask that happens to be all one document.
        doc_ids = batch["doc_ids"] if self.cfg.data.document_mask else None
        return model(batch["input_ids"], labels=batch["labels"], positions=batch["positions"], doc_ids=doc_ids)

    def units(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def fingerprint(self, batch: dict) -> torch.Tensor:
        return batch["input_ids"].sum()

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        cols = self.cfg.data.seq_len // cp
        ids = torch.zeros(rows, cols, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "positions": torch.arange(cols).expand(rows, cols).clone(),
                "doc_ids": torch.zeros(rows, cols, dtype=torch.long)}

    def sample_shape(self) -> str:
        return f"seq_len {self.cfg.data.seq_len}"

    def step_size(self, global_batch: int) -> str:
        seq = self.cfg.data.seq_len
        return f"{global_batch} x {seq} = {global_batch * seq:,} tokens/step"

    def next_steps(self, run_dir: str) -> str:
        return f"keel generate {run_dir} --prompt \"...\"   |   keel export hf {run_dir} OUT_DIR"

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        loss = sums["loss"] / max(sums["units"], 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def decode_text(model, tokenizer_dir: Optional[Path], prompt: str, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, seed: int) -> str:
    """Sample a continuation of `prompt` with the model's KV-cache generation (the LM families' decode)."""
    if tokenizer_dir is None:
        raise ConfigError("generate: this checkpoint has no tokenizer/ folder saved with it")
    tokenizer = Tokenizer.load(str(tokenizer_dir))
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
    out = model.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, stop_ids=(tokenizer.eos_id,), seed=seed)
    return tokenizer.decode(out.tokens[0])
