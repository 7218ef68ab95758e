"""Recipes: YAML validated against a typed schema.

A recipe is YAML with the sections below. `extends: other.yaml` deep-merges the recipe over
another (paths relative to the recipe), and `key.sub=value` overrides from the command line are
applied last, their values parsed as YAML scalars. Every problem is a ConfigError whose message
starts with the dotted key (or the file) and says what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from keel.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "keel"
    out_dir: str = "runs/keel"  # relative paths are relative to the working directory


@dataclass
class DataSource:
    # A megatron indexed-dataset prefix (PREFIX.bin/.idx), a .txt/.jsonl file or folder of them
    # (tokenized into data.cache_dir on first use), or `corpus:NAME` for a fetched real corpus.
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    tokenizer: str = "smollm2"  # `smollm2` (the fetched real tokenizer) or an HF tokenizer folder
    seq_len: int = 256
    sources: list[DataSource] = field(default_factory=list)
    format: Literal["pretrain", "sft"] = "pretrain"
    text_key: str = "text"  # jsonl field holding a document (pretrain)
    eval_fraction: float = 0.02  # share of each source's documents held out for eval
    cache_dir: Optional[str] = None  # default: $KEEL_HOME/data
    shuffle: bool = True


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batch: int = 4  # sequences per rank per forward
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    log_every: int = 1
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 48
    # A NaN/Inf loss or gradient never updates the weights; then: skip the step, roll back to the
    # last committed checkpoint and replay, or stop with an error (keel/train/faults.py).
    nonfinite: Literal["skip", "rollback", "stop"] = "stop"


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on hidden matrices, AdamW on the rest
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    muon_lr: Optional[float] = None  # muon: lr of the Muon groups; None: optim.lr
    muon_momentum: float = 0.95
    muon_weight_decay: Optional[float] = None  # None: optim.weight_decay
    ns_steps: int = 5  # Newton-Schulz iterations


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages' ranks (torch.distributed.pipelining, keel/train/pipeline.py)
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    pp_stages_per_rank: int = 0  # virtual stages per pp rank; 0: 2 for interleaved_1f1b, else 1
    pp_layers: Optional[list[int]] = None  # layers per stage, in stage order; default: an even split
    dp_replicate: int = 1  # DDP replicas (HSDP together with dp_shard)
    dp_shard: int = -1  # FSDP2 shards; -1: every rank the other dims leave
    cp: int = 1
    tp: int = 1  # Megatron-style tensor parallelism (DTensor), inside each data-parallel rank
    sequence_parallel: bool = True  # with tp > 1: norms and residuals run on sequence shards
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    compile: bool = False  # torch.compile each block
    # The training engine: keel's own (DDP / FSDP2 / TP) or DeepSpeed ZeRO (keel/train/deepspeed.py).
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 1  # deepspeed: ZeRO stage 1 | 2 | 3
    offload_optimizer: bool = False  # deepspeed: optimizer states (and step) on the CPU
    offload_params: bool = False  # deepspeed, zero_stage 3 only: parameters on the CPU
    ds_config: Optional[Any] = None  # deepspeed: a JSON file path or a mapping, merged over the generated config


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast compute, fp32 master weights
    fp8: Literal["off", "torchao", "te"] = "off"  # FP8 linears in the blocks (keel/train/precision.py)
    # torchao: tensorwise | rowwise; te: delayed | current. None: tensorwise / delayed.
    fp8_recipe: Optional[Literal["tensorwise", "rowwise", "delayed", "current"]] = None


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint in out_dir; never; or a checkpoint path


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"
    project: str = "keel"
    progress: bool = True  # a live progress line on rank 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = None  # the registered family's config dataclass, chosen by model.name
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rl: Any = None  # keel/rl/config.py RLConfig, validated there when present (`keel rl`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- YAML, extends, overrides

def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: Path, _seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"extends: expected a recipe path, got {parent!r} in {path}")
    return deep_merge(load_raw(path.parent / parent, _seen + (path,)), data)


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"{override}: an override must look like key.sub=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{override}: an override must look like key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- typed validation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, key: str):
    """Check `value` against type `tp` and return it converted (ints for floats, dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp} at {key}")


def build_dataclass(cls, data, key: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys with a did-you-mean."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{prefix}{name}: unknown key{hint}")
        kwargs[name] = coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _positive(cfg: Config, *dotted: str) -> None:
    for key in dotted:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")


def validate(cfg: Config) -> None:
    """Value checks that no type can express. Checks that need the world size live in train/."""
    _positive(cfg, "train.steps", "train.micro_batch", "train.global_batch", "data.seq_len",
              "optim.lr", "parallel.pp", "parallel.dp_replicate", "parallel.cp", "parallel.tp",
              "train.log_every", "train.eval_batches", "checkpoint.keep_last")
    for key in ("optim.weight_decay", "optim.eps", "optim.warmup_steps", "train.grad_clip",
                "checkpoint.every", "train.eval_every", "train.sample_tokens"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(getattr(cfg, section), name)}")
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: expected 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard: must be a positive integer or -1, got {cfg.parallel.dp_shard}")
    if cfg.train.global_batch % cfg.train.micro_batch:
        raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                          f"train.micro_batch {cfg.train.micro_batch}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {cfg.data.eval_fraction}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {cfg.optim.decay_fraction}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if not cfg.data.sources and cfg.rl is None:  # RL recipes take prompts from rl.prompts
        raise ConfigError("data.sources: at least one data source is required")
    for i, source in enumerate(cfg.data.sources):
        if not source.path:
            raise ConfigError(f"data.sources[{i}].path: required")
        if source.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight: must be > 0, got {source.weight}")
    from keel.model.registry import get_model_spec
    spec = get_model_spec(cfg.model.name)
    for dim in ("tp", "cp", "pp"):
        if getattr(cfg.parallel, dim) > 1 and dim not in spec.model_parallel:
            raise ConfigError(f"parallel.{dim}: the {spec.name} family does not support it yet; "
                              f"it trains with data parallelism (parallel.dp_shard / dp_replicate)")
    if cfg.parallel.pp > 1:
        from keel.train.pipeline import validate_pipeline
        validate_pipeline(cfg.parallel, cfg.model)
    if cfg.data.seq_len % (2 * cfg.parallel.cp):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} must be divisible by 2 * parallel.cp "
                          f"= {2 * cfg.parallel.cp} (each cp rank holds two balanced chunks)")
    for key in ("n_heads", "n_kv_heads"):
        heads = getattr(cfg.model, key, None)
        if heads is not None and heads % cfg.parallel.tp:
            raise ConfigError(f"parallel.tp: {cfg.parallel.tp} does not divide model.{key} {heads}")
    if cfg.precision.fp8 != "off":
        from keel.train.precision import fp8_recipe
        fp8_recipe(cfg.precision)
    elif cfg.precision.fp8_recipe is not None:
        raise ConfigError("precision.fp8_recipe: set precision.fp8 (torchao or te) to use an FP8 recipe")
    cfg.model.validate()


def config_from_dict(raw: dict, source: str = "recipe") -> Config:
    from keel.model.registry import get_model_spec

    raw = dict(raw)
    model_raw = raw.pop("model", None)
    if not isinstance(model_raw, dict) or "name" not in model_raw:
        raise ConfigError("model.name: required (a registered model family, e.g. 'llama')")
    spec = get_model_spec(model_raw["name"])
    cfg = build_dataclass(Config, raw)
    cfg.model = build_dataclass(spec.config_cls, model_raw, "model")
    validate(cfg)
    if cfg.rl is not None:
        from keel.rl.config import validate_rl_section
        validate_rl_section(cfg)
    return cfg


def load_recipe(path, overrides: Optional[list[str]] = None) -> Config:
    """Load, merge, override and validate a recipe; raise ConfigError naming any bad key."""
    raw = load_raw(Path(path))
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw, str(path))


def save_resolved(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
