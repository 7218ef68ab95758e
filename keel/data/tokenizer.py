"""A thin wrapper over a Hugging Face fast tokenizer, with the few things training needs.

`Tokenizer.load("smollm2")` gives the fetched real SmolLM2 tokenizer; any other spec is a folder of
HF tokenizer files (tokenizer.json, tokenizer_config.json, ...). Nothing is downloaded at run time.
Encoding never adds special tokens on its own: documents get EOS appended by preprocessing, so
what reaches the model is decided in one place.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from keel.data.assets import asset_path
from keel.errors import DataError

BUILTIN = ("smollm2",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class Tokenizer:
    def __init__(self, hf, name: str, source: Path):
        self.hf = hf  # the transformers tokenizer (kept public for chat templates, offsets)
        self.name = name
        self.source = source
        self.vocab_size = len(hf)  # includes added special tokens: the embedding must cover them
        self.eos_id = hf.eos_token_id
        self.bos_id = hf.bos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        if self.eos_id is None:
            raise DataError(f"{source}: tokenizer has no eos token (expected one to separate documents)")

    @classmethod
    def load(cls, spec: str) -> "Tokenizer":
        """`smollm2` or a folder of HF tokenizer files; a bad spec is a one-line DataError."""
        spec = str(spec)
        folder = asset_path(spec) if spec in BUILTIN else Path(spec).expanduser()
        if not folder.is_dir():
            raise DataError(f"{spec}: tokenizer folder not found (expected a folder of HF tokenizer "
                            f"files such as tokenizer.json, or one of {list(BUILTIN)})")
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise DataError(f"{folder}: no tokenizer files found (expected one of {', '.join(TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for unreadable folders
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{folder}: not a valid HF tokenizer folder ({first_line[:200]})") from None
        if not getattr(hf, "is_fast", False):
            raise DataError(f"{folder}: expected a fast tokenizer (tokenizer.json); found a slow one")
        # The cache key must change whenever the vocabulary or merges change, not just the folder
        # name, so hash the canonical serialisation of the backend tokenizer.
        digest = hashlib.sha1(hf.backend_tokenizer.to_str().encode()).hexdigest()[:8]
        base = spec if spec in BUILTIN else re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.resolve().name)
        return cls(hf, f"{base}-{digest}", folder)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        # The Rust backend encodes a batch in parallel threads; much faster than a Python loop.
        out = [e.ids for e in self.hf.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        return [self._with_bos(ids) for ids in out] if add_bos else out

    def _with_bos(self, ids: list[int]) -> list[int]:
        return ids if self.bos_id is None else [self.bos_id] + ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def save(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
