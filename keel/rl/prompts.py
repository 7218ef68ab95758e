"""Prompt sources for RL: each turns a source config into a list of PromptItems.

`rl.prompts` in a recipe names a source and its options, e.g.
  {source: reasoning_gym, name: basic_arithmetic, size: 2000, seed: 0}
  {source: jsonl, path: data/prompts.jsonl, reward: math}
  {source: long_context, n: 256, context_tokens: 4096, tasks: [retrieval, counting]}
Every item names the reward that scores it (a key of keel.rl.rewards.REWARDS).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from keel.data.jsonl import jsonl_records
from keel.errors import ConfigError, DataError
from keel.rl.rewards import REWARDS, get_reward
from keel.rl.rewards.reasoning_gym import dataset_for, import_reasoning_gym


@dataclass
class PromptItem:
    prompt: str
    task: str  # e.g. "basic_arithmetic", "long_retrieval": rewards are reported and normalised per task
    answer: Any  # what the reward checks
    reward: str  # name in keel.rl.rewards.REWARDS
    source: str  # where the prompt came from; distillation routes prompts to teachers by it
    meta: dict = field(default_factory=dict)


@dataclass
class PromptSource:
    load: Callable[[dict], list[PromptItem]]
    options: dict  # option name -> default; a name mapped to REQUIRED must be given


REQUIRED = object()
PROMPT_SOURCES: dict[str, PromptSource] = {}


def register_prompt_source(source_name: str, **options):
    def decorator(load):
        PROMPT_SOURCES[source_name] = PromptSource(load, options)
        return load
    return decorator


def _as_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"rl.prompts: expected a mapping with a 'source' key, got {type(cfg).__name__}")


def _unknown(kind: str, key: str, name, choices) -> ConfigError:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown {kind} {name!r}{hint}; expected one of {sorted(choices)}")


def source_options(cfg, key: str = "rl.prompts") -> tuple[str, dict]:
    """(source name, its options with defaults filled in), or a ConfigError naming the bad key."""
    cfg = {k: v for k, v in _as_dict(cfg).items() if v is not None or k == "source"}
    name = cfg.pop("source", None)
    if name not in PROMPT_SOURCES:
        raise _unknown("prompt source", f"{key}.source", name, PROMPT_SOURCES)
    spec = PROMPT_SOURCES[name]
    for option in cfg:
        if option not in spec.options:
            raise _unknown(f"option of prompt source {name!r}", f"{key}.{option}", option, spec.options)
    options = {**spec.options, **cfg}
    for option, value in options.items():
        if value is REQUIRED:
            raise ConfigError(f"{key}.{option}: required by prompt source {name!r}")
    return name, options


def load_prompts(source_cfg, key: str = "rl.prompts") -> list[PromptItem]:
    name, options = source_options(source_cfg, key)
    items = PROMPT_SOURCES[name].load(options)
    for item in items[:1] + items[-1:]:
        get_reward(item.reward, f"{key}.reward")
    return items


# ---------------------------------------------------------------------------------------------- jsonl

@register_prompt_source("jsonl", path=REQUIRED, reward=None, task="jsonl", think_gate=False)
def load_jsonl(opts: dict) -> list[PromptItem]:
    """One JSON object per line: prompt and answer required; task, reward, source, meta optional.

    A line's own `reward` overrides the source's; one of the two must name a known reward.
    """
    path = Path(opts["path"])
    items = []
    for where, row in jsonl_records(path, "prompt file"):
        for required in ("prompt", "answer"):
            if required not in row:
                raise DataError(f"{where}: missing required field {required!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string")
        reward = row.get("reward", opts["reward"])
        if reward is None:
            raise DataError(f"{where}: missing field 'reward' (or set rl.prompts.reward)")
        if reward not in REWARDS:
            close = difflib.get_close_matches(str(reward), list(REWARDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: unknown reward {reward!r}{hint}; expected one of {sorted(REWARDS)}")
        meta = row.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{where}: field 'meta' must be an object")
        meta.setdefault("think_gate", bool(opts["think_gate"]))
        items.append(PromptItem(prompt=row["prompt"], task=str(row.get("task", opts["task"])),
                                answer=row["answer"], reward=reward,
                                source=str(row.get("source", path.stem)), meta=meta))
    if not items:
        raise DataError(f"{path}: no prompts in file")
    return items


# -------------------------------------------------------------------------------------- reasoning_gym

@register_prompt_source("reasoning_gym", name=REQUIRED, size=1000, seed=0, instruction="simple",
                        config={}, think_gate=False)
def load_reasoning_gym(opts: dict) -> list[PromptItem]:
    """Procedurally generated tasks, with reasoning-gym's own instruction to end on the answer.

    `instruction` names one of reasoning-gym's SYSTEM_PROMPTS ("simple", "default", "DeepSeekZero",
    "direct", "chain_of_draft"; all ask for the final answer last, in <answer> tags) or "none". It
    is put before the question, and also kept in meta["system_prompt"] for chat templates.
    """
    rg = import_reasoning_gym()
    name = opts["name"]
    if name not in rg.factory.DATASETS:
        raise _unknown("reasoning-gym dataset", "rl.prompts.name", name, rg.factory.DATASETS)
    prompts = rg.utils.SYSTEM_PROMPTS
    if opts["instruction"] != "none" and opts["instruction"] not in prompts:
        raise _unknown("instruction", "rl.prompts.instruction", opts["instruction"], [*prompts, "none"])
    system = "" if opts["instruction"] == "none" else prompts[opts["instruction"]].strip()
    config = {"size": int(opts["size"]), "seed": int(opts["seed"]), **dict(opts["config"])}
    try:
        dataset = dataset_for(name, config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"rl.prompts.config: reasoning-gym rejected {config} for {name!r}: {exc}") from None
    items = []
    for entry in dataset:
        prompt = f"{system}\n\n{entry['question']}" if system else entry["question"]
        items.append(PromptItem(
            prompt=prompt, task=name, answer=entry["answer"], reward="reasoning_gym", source="reasoning_gym",
            meta={"entry": entry, "dataset": name, "dataset_config": config, "system_prompt": system,
                  "question": entry["question"], "think_gate": bool(opts["think_gate"])}))
    return items
