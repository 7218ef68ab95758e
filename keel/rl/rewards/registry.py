"""The reward registry: `item.reward` picks one; each is `reward(response, item) -> float` in [0, 1].

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
