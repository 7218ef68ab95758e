"""Rewards by name (keel/rl/rewards/registry.py): the metric rewards (EM, SubEM, F1, ROUGE-L, NDCG,
pairwise accuracy, IoU, accuracy), the math verifier and reasoning-gym's own scorer. Importing this
package registers them all."""
from __future__ import annotations

from typing import Callable

from keel.rl.rewards import reasoning_gym  # noqa: F401  (registers "reasoning_gym")
from keel.rl.rewards.math import math_reward
from keel.rl.rewards.metrics import METRICS
from keel.rl.rewards.registry import REWARDS, get_reward, register_reward  # noqa: F401  (the public API)


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
