"""Rewards by name: `item.reward` picks one; each is `reward(response, item) -> float` in [0, 1].

Every reward first applies the `<think>` format gate when the item asks for it
(`item.meta["think_gate"]`, GoLongRL's rule: violated format scores 0) and scores only the text after
`</think>`. Registries are open: `register_reward("name")(fn)` adds one, where `fn(text, item)` sees
the gated text.
"""
from __future__ import annotations

import difflib
import functools
from typing import Callable

from keel.errors import ConfigError
from keel.rl.rewards.format import visible_text
from keel.rl.rewards.math import math_reward
from keel.rl.rewards.metrics import METRICS

RewardFn = Callable[[str, object], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    def decorator(score: Callable[[str, object], float]) -> RewardFn:
        @functools.wraps(score)
        def reward(response: str, item) -> float:
            text = visible_text(response, bool(item.meta.get("think_gate", False)))
            return 0.0 if text is None else float(score(text, item))
        REWARDS[name] = reward
        return reward
    return decorator


def get_reward(name: str, key: str = "reward") -> RewardFn:
    if name not in REWARDS:
        close = difflib.get_close_matches(str(name), list(REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown reward {name!r}{hint}; expected one of {sorted(REWARDS)}")
    return REWARDS[name]


def gold_answers(answer) -> list[str]:
    """A gold answer as the list of strings GoLongRL's metrics take (one string, or one per item)."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    return [str(answer)]


def _metric_reward(metric) -> Callable[[str, object], float]:
    return lambda text, item: metric(gold_answers(item.answer), text)


for _name, _metric in METRICS.items():
    register_reward(_name)(_metric_reward(_metric))

register_reward("math")(lambda text, item: math_reward(text, item.answer))

# reasoning_gym registers itself; imported last because it needs REWARDS above.
from keel.rl.rewards import reasoning_gym  # noqa: E402,F401
