"""The `<think>` format gate of GoLongRL and the answer area a metric scores.

GoLongRL (verl `reward_score/__init__.py`) gives reward 0 when `</think>` is missing or when `<think>`
or `</think>` appears more than once; `<think>` itself may be absent because Qwen3's chat template
opens it in the prompt. Metrics then score only the text after `</think>`.
"""
from __future__ import annotations

from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_MARKERS = ("[Answer]", "Answer:")


def think_format_ok(response: str) -> bool:
    return (THINK_CLOSE in response and response.count(THINK_OPEN) <= 1
            and response.count(THINK_CLOSE) <= 1)


def visible_text(response: str, think_gate: bool) -> Optional[str]:
    """The part of `response` after the reasoning, or None when the gate is on and the format is broken.

    Without the gate a response that has reasoning is still scored only on what follows it, so a
    model cannot earn reward for an answer it merely mentions while thinking.
    """
    if think_gate and not think_format_ok(response):
        return None
    return response.rsplit(THINK_CLOSE, 1)[-1]


def answer_area(text: str) -> str:
    """Text after the last answer marker (LongBench-Pro's `[Answer]`, or `Answer:`), else all of it."""
    cut = -1
    for marker in ANSWER_MARKERS:
        pos = text.rfind(marker)
        if pos >= 0 and pos + len(marker) > cut:
            cut = pos + len(marker)
    return (text[cut:] if cut >= 0 else text).strip()
