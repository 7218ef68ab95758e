"""What every rollout engine takes and returns (keel/rl/engines/__init__.py looks engines up by name)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop_ids: tuple = ()  # a sequence ends after emitting any of these (the stop token is kept)
    n: int = 1  # samples per prompt
    seed: Optional[int] = None
    # One seed per prompt: the draws of a prompt's samples then depend on its seed alone, not on the
    # other prompts of the call, so a prompt's rollouts are the same whichever rank, batch or decode
    # slot generates them (RL seeds them from the run seed and the prompt's global index).
    prompt_seeds: Optional[tuple] = None


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a prompt seeded `prompt_seed` (a 63-bit mix of the two)."""
    return (int(prompt_seed) * 1_000_003 + sample * 7_919 + 1) % (2 ** 63)


@dataclass
class Rollout:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (hit a stop id) | "length" (max_tokens)
    prompt_index: int = 0  # which prompt of the generate() call this answers
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def sleep(self) -> None:
        """Free the engine's memory while the trainer trains; the trainer calls it once its rollouts
        are collected; the next call is update_weights (an engine may drop its weights here)."""
