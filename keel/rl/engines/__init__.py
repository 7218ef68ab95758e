"""Rollout engines: one interface, looked up by name (`rl.engine: native | vllm`).

    engine = build_engine("native", policy_model, rl_cfg)
    rollouts = engine.generate(prompt_token_lists, SamplingParams(max_tokens=128, temperature=1.0, seed=3))
    engine.update_weights(policy.named_parameters(), version=step)

`generate` returns one Rollout per prompt and sample (prompt-major: prompt 0's n samples first).
Each Rollout's logprobs are the engine's log p(token) under the distribution the token was drawn
from — temperature-scaled, then top-k/top-p truncated and renormalised — the behaviour policy that
truncated importance sampling corrects for against the trainer's `keel.rl.scoring.logprobs_of` (the
same without truncation: equal when top_p = 1 and top_k = 0). The vLLM engine asks vLLM for these
processed log-probabilities (`logprobs_mode="processed_logprobs"`, keel/rl/engines/vllm.py).

`engine.sleep()` frees a colocated engine's memory while the trainer trains (vLLM: level-2 sleep,
which discards its weights); the next call must then be `update_weights`.
"""
from __future__ import annotations

from typing import Callable

from keel.config import choose
from keel.rl.engines.base import Rollout, RolloutEngine, SamplingParams  # noqa: F401  (the public API)
from keel.rl.engines.native import NativeEngine
from keel.rl.engines.vllm import VLLMEngine  # imports the vllm package itself only when built

__all__ = ["ENGINES", "NativeEngine", "Rollout", "RolloutEngine", "SamplingParams", "VLLMEngine", "build_engine"]

# rl.engine -> (policy model, RLConfig, **kw) -> RolloutEngine.
ENGINES: dict[str, Callable] = {"native": NativeEngine.from_policy, "vllm": VLLMEngine.from_policy}


def build_engine(name: str, model, rl_cfg, **kw) -> RolloutEngine:
    choose("rl.engine", name, ENGINES)
    return ENGINES[name](model, rl_cfg, **kw)
