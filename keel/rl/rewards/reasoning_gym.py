"""Scoring by reasoning-gym's own `score_answer`, on the entry the prompt source generated.

The answer is what reasoning-gym's prompts ask for: the last `<answer>...</answer>`
(`reasoning_gym.utils.extract_answer`); a response without tags falls back to the math extractor
(`\\boxed{}`, "answer is", last number), which is what small models trained on arithmetic produce.
"""
from __future__ import annotations

import functools
import json

from keel.errors import MissingExtraError
from keel.rl.rewards.math import extract_final_answer
from keel.rl.rewards.registry import register_reward


def import_reasoning_gym():
    try:
        import reasoning_gym
        import reasoning_gym.utils
    except ImportError as exc:
        raise MissingExtraError("reasoning-gym is not installed; `pip install keel[rl]` "
                                "(or `pip install reasoning-gym==0.1.25`)") from exc
    return reasoning_gym


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str):
    return import_reasoning_gym().create_dataset(name, **json.loads(config_json))


def dataset_for(name: str, config: dict):
    """The (cached) dataset whose `score_answer` judges items made with `config`."""
    return _dataset(name, json.dumps(config, sort_keys=True))


def extract_rg_answer(text: str):
    tagged = import_reasoning_gym().utils.extract_answer(text)
    return tagged if tagged is not None else extract_final_answer(text)


@register_reward("reasoning_gym")
def reasoning_gym_reward(text: str, item) -> float:
    dataset = dataset_for(item.meta["dataset"], item.meta["dataset_config"])
    return float(dataset.score_answer(extract_rg_answer(text), item.meta["entry"]))
