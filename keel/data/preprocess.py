"""Text to tokens: .txt/.jsonl files into a megatron-core indexed dataset (PREFIX.bin/.idx).

A .txt file is one document; a .jsonl line is one document (its `text_key` field). Every document
is one sequence ending in EOS, stored as int32 (vocabularies may exceed 65535).

`resolve_source` turns a recipe's `data.sources[].path` into such a prefix, tokenizing raw text
into the cache once. The cache key hashes the tokenizer and each file's path, size and mtime, so
editing a file or switching tokenizer re-tokenizes and nothing stale is ever reused.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from keel.data.assets import corpus_files, keel_home
from keel.data.packed import megatron_indexed, open_indexed
from keel.data.tokenizer import Tokenizer
from keel.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")
# Tokenize this many documents (or characters) per call into the Rust backend: big enough for its
# thread pool to pay off, small enough to bound memory on huge jsonl files.
_BATCH_DOCS, _BATCH_CHARS = 512, 4 << 20


def iter_documents(path: Path, text_key: str = "text") -> Iterator[tuple[str, int]]:
    """Yield (document text, input bytes consumed) for a .txt or .jsonl file."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8"), path.stat().st_size
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
        return
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: unsupported file type (expected .txt or .jsonl)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                yield "", len(raw)  # blank lines (e.g. a trailing newline) are not documents
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with field '{text_key}'")
            if text_key not in record:
                raise DataError(f"{path}:{lineno}: missing field '{text_key}'")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field '{text_key}' is not a string")
            yield text, len(raw)


def _check_inputs(inputs: list[Path]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("preprocess: no input files given (expected .txt or .jsonl files)")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: input file not found (expected a .txt or .jsonl file)")
        if p.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{p}: unsupported file type (expected .txt or .jsonl)")
    return paths


def preprocess(inputs: list[Path], out_prefix: Path, tokenizer: Tokenizer, text_key: str = "text",
               append_eos: bool = True, progress: bool = True) -> Path:
    """Tokenize `inputs` into out_prefix.bin/.idx, one sequence per non-empty document.

    Both files are written under temporary names and renamed into place only once complete, the
    .idx last: a crash leaves either the old dataset or a .bin without .idx, never a half dataset
    that looks whole."""
    paths = _check_inputs(inputs)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_prefix.parent / f".{out_prefix.name}.{os.getpid()}.tmp"
    tmp_bin, tmp_idx = Path(f"{tmp}.bin"), Path(f"{tmp}.idx")
    builder = megatron_indexed().IndexedDatasetBuilder(str(tmp_bin), dtype=np.int32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                   desc=f"tokenizing {out_prefix.name}", file=sys.stderr, leave=False)
    n_docs, batch, chars, pending_bytes = 0, [], 0, 0

    def flush():
        nonlocal n_docs, chars, pending_bytes
        for ids in tokenizer.encode_batch(batch):
            if append_eos:
                ids.append(tokenizer.eos_id)
            builder.add_item(torch.from_numpy(np.asarray(ids, dtype=np.int32)))
            builder.end_document()
        n_docs += len(batch)
        batch.clear()
        if bar is not None:
            bar.update(pending_bytes)
        chars = pending_bytes = 0

    try:
        for path in paths:
            for text, nbytes in iter_documents(path, text_key):
                if text:  # an empty document would be a lone EOS: noise, so skip it
                    batch.append(text)
                    chars += len(text)
                pending_bytes += nbytes
                if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                    flush()
        flush()
        if n_docs == 0:
            raise DataError(f"{paths[0]}{' ...' if len(paths) > 1 else ''}: no non-empty documents "
                            f"found in {len(paths)} file(s)")
        builder.finalize(str(tmp_idx))
        final_bin, final_idx = Path(f"{out_prefix}.bin"), Path(f"{out_prefix}.idx")
        final_idx.unlink(missing_ok=True)  # so a crash between the renames leaves no stale pair
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        builder.data_file.close()  # idempotent; needed when we leave early with an error
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
    return out_prefix


def _source_files(path: str) -> tuple[str, list[Path]] | Path:
    """A recipe source as either an existing indexed prefix or (cache label, text files)."""
    if path.startswith("corpus:"):
        name = path[len("corpus:"):]
        return name, corpus_files(name)
    p = Path(path).expanduser()
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    if Path(f"{prefix}.bin").exists() or Path(f"{prefix}.idx").exists():
        return prefix
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{p}: unsupported data file (expected PREFIX.bin/.idx, a .txt/.jsonl "
                            f"file or folder, or corpus:NAME)")
        return p.stem, [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{p}: folder holds no .txt or .jsonl files")
        return p.name, files
    raise DataError(f"{path}: data source not found (expected PREFIX.bin/.idx, a .txt/.jsonl file "
                    f"or folder, or corpus:NAME)")


def cache_key(files: list[Path], tokenizer: Tokenizer, text_key: str) -> str:
    h = hashlib.sha1(f"{tokenizer.name}\0{text_key}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def resolve_source(path: str, tokenizer: Tokenizer, cache_dir: Path | None = None,
                   text_key: str = "text", progress: bool = True) -> Path:
    """The indexed-dataset prefix for a recipe source, tokenizing raw text into the cache once."""
    found = _source_files(str(path))
    if isinstance(found, Path):
        open_indexed(found, vocab_size=tokenizer.vocab_size)  # validate now, with a clear message
        return found
    label, files = found
    cache_dir = Path(cache_dir) if cache_dir is not None else keel_home() / "data"
    cache_dir.mkdir(parents=True, exist_ok=True)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "data"
    prefix = cache_dir / f"{label}-{tokenizer.name}-{cache_key(files, tokenizer, text_key)}"
    # Every data-parallel rank resolves the same sources at start-up: the lock makes one of them
    # tokenize while the others wait and then find the finished cache entry.
    with open(f"{prefix}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: ranks may tokenize twice, harmless but slower
        try:
            open_indexed(prefix)
            return prefix
        except DataError:
            pass  # absent, or debris of an interrupted run: (re)build it
        if progress:
            print(f"keel data: tokenizing {len(files)} file(s) of {path} into {prefix}",
                  file=sys.stderr, flush=True)
        return preprocess(files, prefix, tokenizer, text_key=text_key, progress=progress)


def preprocess_main(inputs: list[str], out_prefix: str, tokenizer_spec: str,
                    text_key: str = "text") -> Path:
    """`keel data preprocess INPUT... --out PREFIX --tokenizer SPEC`: folders expand to their
    .txt/.jsonl files, `corpus:NAME` to a fetched corpus."""
    tokenizer = Tokenizer.load(tokenizer_spec)
    files: list[Path] = []
    for item in inputs:
        found = _source_files(item)
        if isinstance(found, Path):
            raise DataError(f"{item}: already a tokenized dataset (expected .txt/.jsonl input)")
        files.extend(found[1])
    prefix = preprocess(files, Path(out_prefix), tokenizer, text_key=text_key)
    ds = open_indexed(prefix)
    n_docs, n_tokens = len(ds.document_indices) - 1, int(np.sum(ds.sequence_lengths, dtype=np.int64))
    print(f"keel data: wrote {prefix}.bin and {prefix}.idx: {n_docs} documents, {n_tokens} tokens "
          f"({tokenizer.name}) from {len(files)} file(s)")
    return prefix
