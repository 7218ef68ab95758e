"""The `rl:` section of a recipe and the RL trainer registry.

One RLConfig holds what every RL trainer shares (policy, engine, rollouts, sampling, estimator and
loss names). A trainer registers itself with `@register_rl_trainer(name, subsection=ItsConfig)`;
its sub-section (`rl.<name>:`, e.g. rl.dpo) becomes a typed field of the `rl:` schema, validated by
its own dataclass, and its `validate_config` runs when the recipe is loaded. Nothing here names a
trainer. The usual sections still apply: `optim` (learning rate, schedule), `train.seed`,
`train.grad_clip`, `checkpoint` (every, keep_last, resume), `logging`, `run.out_dir`, `precision.dtype`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from keel.config import build_dataclass, choose, register_section
from keel.errors import ConfigError
from keel.rl import losses
from keel.rl.advantages import estimator_options
from keel.rl.engines import ENGINES


@dataclass
class SamplingConfig:
    max_tokens: int = 256  # longest response, in tokens
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass; 1: off
    top_k: int = 0  # 0: off
    stop: list[str] = field(default_factory=list)  # extra stop strings, each must be one token
    stop_at_eos: bool = True  # a response ends at the tokenizer's EOS token


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = 0.5  # share of GPU memory vLLM may take (weights + KV cache)
    dtype: str = "bfloat16"  # vLLM's compute dtype
    tensor_parallel_size: int = 1  # vLLM's own tensor parallelism
    enforce_eager: bool = False  # true: no CUDA graphs (faster start, slower decode)
    sleep: bool = True  # free vLLM's weights + KV cache while the trainer runs (enable_sleep_mode)
    bucket_mb: int = 512  # tensor_parallel_size > 1: weights pushed to vLLM's workers in buckets of this many MiB
    max_model_len: int = 0  # 0: prompt + response budget of this recipe


@dataclass
class RLConfig:
    trainer: str = "grpo"  # a registered RL trainer: grpo | dpo | opd | rec (RL_TRAINERS)
    # The policy's starting weights: `smollm2`, an HF model folder or .gguf, or a keel run/checkpoint.
    policy: str = "smollm2"
    chat_template: bool = True  # wrap each prompt as a user turn with the tokenizer's chat template
    system_prompt: Optional[str] = None  # None: the template's default system turn
    engine: str = "native"  # native | vllm (ENGINES in keel/rl/engines)
    engine_batch: int = 32  # native: sequences decoded at once (finished slots are refilled)
    engine_dtype: str = "float32"  # native: dtype of the engine's copy of the policy
    # native on CPU: torch threads while decoding. Decode is a chain of small matmuls that wait on
    # each other's threads: 1 thread measured ~10x faster than 2 on a busy 2-core machine.
    engine_cpu_threads: int = 1
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    prompts: dict = field(default_factory=dict)  # a prompt source (keel/rl/prompts.py)
    eval_prompts: Optional[dict] = None  # held-out prompts scored greedily every eval_every steps
    eval_every: int = 0  # 0: only before the first and after the last step
    eval_max_tokens: int = 0  # 0: sampling.max_tokens
    eval_temperature: float = 0.0  # 0: greedy (GoLongRL validates at 0.6 / top-p 0.95)
    eval_top_p: float = 1.0  # held-out eval: nucleus mass
    steps: int = 100  # RL steps (each: rollouts, then mini_batches optimizer updates)
    prompts_per_step: int = 8  # prompts sampled per step
    group_size: int = 8  # rollouts per prompt (G)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_prompt_tokens: int = 1024  # the longest templated prompt, in tokens
    # A longer prompt: dropped when the prompts are loaded (GoLongRL's filter_overlong_prompts), or cut
    # from the left after the chat template (which can cut the template's own header).
    overlong_prompts: Literal["filter", "truncate_left"] = "filter"
    advantage: str = "grpo"  # keel/rl/advantages.py ADVANTAGE_ESTIMATORS
    advantage_cfg: dict = field(default_factory=dict)  # that estimator's options (checked by it)
    loss: str = "ppo_clip"  # keel/rl/losses.py POLICY_LOSSES
    loss_cfg: dict = field(default_factory=dict)  # that loss's options, e.g. clip_low, clip_high, dual_clip
    # per-token terms -> one loss (keel/rl/losses.py LOSS_AGGREGATIONS): token_mean (DAPO) |
    # seq_mean_token_mean (GRPO as published) | seq_mean_token_sum_norm (Dr. GRPO, over rl.sampling.max_tokens)
    loss_agg: str = "token_mean"
    # Truncated importance sampling of trainer vs rollout-engine token probabilities: weights
    # clipped to [is_cap_low, is_cap] (is_cap 0: off); a sequence with a ratio below is_veto is dropped.
    is_cap: float = 2.0
    is_cap_low: float = 0.0  # lower clip of the importance weights (0: none)
    is_low_mode: Literal["clip", "mask"] = "clip"  # below is_cap_low: lift the weight to it, or drop the token (weight 0)
    is_veto: Optional[float] = None  # drop a sequence whose token ratio falls below this (None: never)
    kl_coef: float = 0.0  # > 0: KL to a frozen copy of the starting policy
    kl_kind: str = "k3"  # KL estimator: k1 | k2 | k3
    entropy_coef: float = 0.0  # weight of an entropy bonus
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO filter_groups)
    max_gen_batches: int = 4  # dynamic sampling: generation rounds per step before training anyway
    mini_batches: int = 1  # optimizer updates per step (PPO mini-batches), 1 epoch
    micro_batch: int = 8  # sequences per forward/backward (padded to the micro-batch's longest)
    # > 0: micro-batches by a token budget instead, each packed into one row (document-masked, no
    # padding computed); a sequence longer than the budget goes alone. GRPO only.
    micro_batch_tokens: int = 0
    # true: step t+1's rollouts are generated with the weights step t starts from, in a background
    # thread while step t trains (one step stale; the IS weights correct it, so rl.is_cap > 0). GRPO.
    one_step_off_policy: bool = False


# ------------------------------------------------------------------ the trainer registry

RL_TRAINERS: dict[str, type] = {}
RL_SUBSECTIONS: dict[str, type] = {}  # rl.<name> -> the dataclass of a trainer's own options


def register_rl_trainer(name: str, subsection: Optional[type] = None):
    """Class decorator: `rl.trainer: name` runs this class; `rl.<name>:` is parsed as `subsection`."""
    def decorator(cls):
        RL_TRAINERS[name] = cls
        if subsection is not None:
            RL_SUBSECTIONS[name] = subsection
        return cls
    return decorator


def get_rl_trainer(name: str):
    choose("rl.trainer", name, RL_TRAINERS)
    return RL_TRAINERS[name]


def rl_schema() -> type:
    """RLConfig plus one optional field per registered trainer sub-section (rl.dpo, rl.opd, ...)."""
    extra = [(name, Optional[cls], field(default=None)) for name, cls in RL_SUBSECTIONS.items()]
    if not extra:
        return RLConfig
    return dataclasses.make_dataclass("RLConfig", extra, bases=(RLConfig,))


def build_rl_config(raw) -> RLConfig:
    return raw if isinstance(raw, RLConfig) else build_dataclass(rl_schema(), raw, "rl")


def validate_rl(rl: RLConfig) -> None:
    """Checks that need no model or data: names exist, numbers are in range."""
    choose("rl.trainer", rl.trainer, RL_TRAINERS)
    choose("rl.engine", rl.engine, ENGINES)
    choose("rl.engine_dtype", rl.engine_dtype, ("float32", "bfloat16", "float16"))
    for key in ("steps", "prompts_per_step", "group_size", "engine_batch", "engine_cpu_threads", "micro_batch",
                "mini_batches", "max_gen_batches", "max_prompt_tokens"):
        if getattr(rl, key) <= 0:
            raise ConfigError(f"rl.{key}: must be > 0, got {getattr(rl, key)}")
    for key in ("is_cap", "kl_coef", "entropy_coef", "eval_every", "eval_max_tokens", "micro_batch_tokens"):
        if getattr(rl, key) < 0:
            raise ConfigError(f"rl.{key}: must be >= 0, got {getattr(rl, key)}")
    s = rl.sampling
    if s.max_tokens <= 0:
        raise ConfigError(f"rl.sampling.max_tokens: must be > 0, got {s.max_tokens}")
    if s.temperature < 0:
        raise ConfigError(f"rl.sampling.temperature: must be >= 0, got {s.temperature}")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"rl.sampling.top_p: must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise ConfigError(f"rl.sampling.top_k: must be >= 0, got {s.top_k}")
    if rl.is_cap and not 0.0 <= rl.is_cap_low < rl.is_cap:
        raise ConfigError(f"rl.is_cap_low: must be in [0, rl.is_cap), got {rl.is_cap_low}")
    if rl.vllm.bucket_mb <= 0:
        raise ConfigError(f"rl.vllm.bucket_mb: must be > 0, got {rl.vllm.bucket_mb}")
    if not 0.0 < rl.vllm.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"rl.vllm.gpu_memory_utilization: must be in (0, 1], got "
                          f"{rl.vllm.gpu_memory_utilization}")
    get_rl_trainer(rl.trainer).validate_config(rl)  # the trainer's own checks (G >= 2 for grpo, ...)


def check_registries(rl: RLConfig) -> None:
    """Names looked up in the RL-algorithm registries (advantage estimators, policy losses)."""
    estimator_options(rl.advantage, rl.advantage_cfg, "rl.advantage_cfg" if rl.advantage_cfg else "rl.advantage")
    choose("rl.loss", rl.loss, losses.POLICY_LOSSES)
    choose("rl.loss_agg", rl.loss_agg, losses.LOSS_AGGREGATIONS)
    losses._options(rl.loss, loss_options(rl), "rl.loss_cfg")


def loss_options(rl: RLConfig) -> dict:
    """rl.loss_cfg plus the KL / entropy terms, for losses that take them."""
    known = losses.POLICY_LOSSES[rl.loss].options
    extra = {"kl_coef": rl.kl_coef, "kl_kind": rl.kl_kind, "entropy_coef": rl.entropy_coef}
    return {**{k: v for k, v in extra.items() if k in known}, **rl.loss_cfg}


def resolve_rl_section(raw, key: str = "rl") -> RLConfig:
    """The `rl:` section (registered below): built against the registered trainers, then checked."""
    rl = build_rl_config(raw)
    validate_rl(rl)
    return rl


register_section("rl", resolve=resolve_rl_section, optional=True, provides_data=True)

