"""Reading .jsonl record files (SFT data, RL prompts, preference pairs) with errors that name the line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from keel.errors import DataError


def jsonl_records(path, kind: str, hint: str = "") -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line, where = "file:line". A missing file, a line that is
    not JSON and a line that is not a JSON object are each a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} not found{hint}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid JSON (not UTF-8 text)") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
