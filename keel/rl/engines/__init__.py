"""Rollout engines: one interface, looked up by name (`rl.engine: native | vllm`).

    engine = build_engine("native", policy_model, rl_cfg)
    rollouts = engine.generate(prompt_token_lists, SamplingParams(max_tokens=128, temperature=1.0, seed=3))
    engine.update_weights(policy.named_parameters(), version=step)

`generate` returns one Rollout per prompt and sample (prompt-major: prompt 0's n samples first).
Each Rollout's logprobs are the engine's log p(token) under the temperature-scaled distribution,
before top-k/top-p truncation: the same quantity `keel.rl.run.logprobs_of` recomputes on the
trainer, so the two can be compared token by token (truncated importance sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

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


def _native(model, rl_cfg, **kw):
    from keel.rl.engines.native import NativeEngine
    return NativeEngine.from_policy(model, rl_cfg, **kw)


def _vllm(model, rl_cfg, **kw):
    from keel.rl.engines.vllm import VLLMEngine  # imports vllm itself only on use
    return VLLMEngine.from_policy(model, rl_cfg, **kw)


# rl.engine -> (policy model, RLConfig, **kw) -> RolloutEngine. Imported lazily: vllm is an extra.
ENGINES: dict[str, Callable] = {"native": _native, "vllm": _vllm}


def build_engine(name: str, model, rl_cfg, **kw) -> RolloutEngine:
    from keel.rl.config import _choice
    _choice("rl.engine", name, ENGINES)
    return ENGINES[name](model, rl_cfg, **kw)
