"""The `data:` section of a recipe (registered here, by the data layer that reads it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from keel.config import register_section
from keel.errors import ConfigError


@dataclass
class DataSource:
    # A megatron indexed-dataset prefix (PREFIX.bin/.idx), a .txt/.jsonl file or folder of them
    # (tokenized into data.cache_dir on first use), or `corpus:NAME` for a fetched real corpus.
    path: str = ""
    weight: float = 1.0  # sampling weight among the sources (Megatron blending)


@dataclass
class DataConfig:
    tokenizer: str = "smollm2"  # `smollm2` (the fetched real tokenizer) or an HF tokenizer folder
    seq_len: int = 256  # tokens per training sequence
    sources: list[DataSource] = field(default_factory=list)  # what to train on; several are blended
    format: Literal["pretrain", "sft"] = "pretrain"  # packed documents, or prompt/response with loss on responses
    text_key: str = "text"  # jsonl field holding a document (pretrain)
    eval_fraction: float = 0.02  # share of each source's documents held out for eval
    cache_dir: Optional[str] = None  # where tokenized corpora are cached; default: $KEEL_HOME/data
    shuffle: bool = True  # shuffle sequences (a pure function of train.seed and the sample index)
    # Packed pretraining rows: true = per-document positions and doc_ids (attention stays inside a
    # document, RoPE restarts at each); false = whole rows, positions 0..L-1 and one doc id (plain causal).
    document_mask: bool = True

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len: must be > 0, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ConfigError(f"data.sources[{i}].path: required")
            if source.weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight: must be > 0, got {source.weight}")


register_section("data", DataConfig)
