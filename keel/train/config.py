"""The recipe sections the training layer owns (`run`, `train`, `optim`, `parallel`, `precision`,
`logging`) and the checks across sections that need its knowledge (a family's parallelisms,
pipeline feasibility, FP8 recipes). All run when a recipe is loaded, before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from keel.config import SECTIONS, Config, register_check, register_section
from keel.errors import ConfigError
from keel.model.registry import get_model_spec
from keel.train.pipeline import validate_pipeline
from keel.train.precision import fp8_recipe


def _at_least(section: str, obj, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ConfigError(f"{section}.{name}: must be {'> 0' if minimum == 1 else '>= 0'}, got {value}")


@dataclass
class RunConfig:
    name: str = "keel"  # the run's name (wandb, SLURM job name)
    out_dir: str = "runs/keel"  # the run directory; relative paths are relative to the working directory


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # model init, data order and sampling
    micro_batch: int = 4  # sequences per rank per forward
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    grad_clip: float = 1.0  # global gradient-norm clip; 0: off
    eval_every: int = 0  # evaluate every N steps; 0: only at the end
    eval_batches: int = 4  # held-out micro-batches per evaluation
    log_every: int = 1  # metrics.jsonl / wandb row every N steps
    sample_prompt: str = "ROMEO:"  # the prompt of the sample printed at the end of `keel train`
    sample_tokens: int = 48  # tokens sampled at the end; 0: no sample
    # A NaN/Inf loss or gradient never updates the weights; then: skip the step, roll back to the
    # last committed checkpoint and replay, or stop with an error (keel/train/faults.py).
    nonfinite: Literal["skip", "rollback", "stop"] = "stop"
    # Python's cyclic garbage collector runs only every N steps (all ranks at the same step, so no
    # rank stalls the others at a random moment); 0: Python's automatic collection
    gc_every: int = 50
    # a torch profiler trace (and on CUDA a memory snapshot) of these steps, in RUN/profile/
    profile_steps: list[int] = field(default_factory=list)
    prefetch: bool = True  # load the next step's batches in a background thread (pinned memory on CUDA)

    def validate(self) -> None:
        _at_least("train", self, 1, "steps", "micro_batch", "global_batch", "log_every", "eval_batches")
        _at_least("train", self, 0, "grad_clip", "eval_every", "sample_tokens", "gc_every")
        bad = [s for s in self.profile_steps if not isinstance(s, int) or s < 1]
        if bad:
            raise ConfigError(f"train.profile_steps: expected step numbers >= 1, got {bad}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"train.global_batch: {self.global_batch} is not a multiple of "
                              f"train.micro_batch {self.micro_batch}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on hidden matrices, AdamW on the rest
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay (never on norms, biases or embedding tables)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # LR schedule after the warmup
    warmup_steps: int = 0  # linear warmup from 0
    min_lr_ratio: float = 0.1  # the schedule's floor, as a share of optim.lr
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    muon_lr: Optional[float] = None  # muon: lr of the Muon groups; None: optim.lr
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    muon_weight_decay: Optional[float] = None  # None: optim.weight_decay
    ns_steps: int = 5  # muon: Newton-Schulz iterations

    def validate(self) -> None:
        _at_least("optim", self, 0, "weight_decay", "eps", "warmup_steps")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {self.betas}")


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages' ranks (torch.distributed.pipelining, keel/train/pipeline.py)
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"  # the pipeline schedule
    pp_stages_per_rank: int = 0  # virtual stages per pp rank; 0: 2 for interleaved_1f1b, else 1
    pp_layers: Optional[list[int]] = None  # layers per stage, in stage order; default: an even split
    dp_replicate: int = 1  # DDP replicas (HSDP together with dp_shard)
    dp_shard: int = -1  # FSDP2 shards; -1: every rank the other dims leave
    cp: int = 1  # context parallelism: each sequence split over cp ranks
    tp: int = 1  # Megatron-style tensor parallelism (DTensor), inside each data-parallel rank
    # MoE expert parallelism: experts sharded over groups of ep data-parallel ranks (not a mesh factor
    # of the world size: ep must divide the data-parallel ranks and model.moe.n_experts)
    ep: int = 1
    sequence_parallel: bool = True  # with tp > 1: norms and residuals run on sequence shards
    activation_checkpoint: Literal["none", "full", "selective"] = "none"  # recompute activations in backward
    compile: bool = False  # torch.compile each block (fullgraph: a graph break is an error, not a slowdown)
    # FSDP2: free each block's gathered weights after its forward and gather again for backward.
    # null: yes, except under pp (a stage's micro-batches reuse the gathered weights)
    reshard_after_forward: Optional[bool] = None
    # FSDP2 with train.global_batch > micro_batch x ranks: reduce-scatter gradients after every
    # micro-batch (keeps only sharded gradients) or only after the last (less traffic, full-size fp32 gradients)
    fsdp_grad_sync: Literal["every_micro_batch", "last_micro_batch"] = "every_micro_batch"
    ddp_bucket_mb: int = 25  # DDP (dp_replicate alone): gradient all-reduce bucket size in MiB
    # The training engine: keel's own (DDP / FSDP2 / TP) or DeepSpeed ZeRO (keel/train/deepspeed.py).
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 1  # deepspeed: ZeRO stage 1 | 2 | 3
    offload_optimizer: bool = False  # deepspeed: optimizer states (and step) on the CPU
    offload_params: bool = False  # deepspeed, zero_stage 3 only: parameters on the CPU
    ds_config: Optional[Any] = None  # deepspeed: a JSON file path or a mapping, merged over the generated config

    def validate(self) -> None:
        _at_least("parallel", self, 1, "pp", "dp_replicate", "cp", "tp", "ep", "ddp_bucket_mb")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: expected 1, 2 or 3, got {self.zero_stage}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard: must be a positive integer or -1, got {self.dp_shard}")


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast compute, fp32 master weights
    fp8: Literal["off", "torchao", "te"] = "off"  # FP8 linears in the blocks (keel/train/precision.py)
    # torchao: rowwise (recommended: a scale per row, the more accurate) | tensorwise (fastest; FP8
    # all-gather under FSDP); te: delayed | current. None: rowwise / delayed.
    fp8_recipe: Optional[Literal["tensorwise", "rowwise", "delayed", "current"]] = None
    # FP8 only for linears with both dims at least this: below it the casts cost more than the
    # faster matmul gains, and small GEMMs are where FP8 loses the most accuracy
    fp8_min_features: int = 1024

    def validate(self) -> None:
        if self.fp8 != "off":
            fp8_recipe(self)
        elif self.fp8_recipe is not None:
            raise ConfigError("precision.fp8_recipe: set precision.fp8 (torchao or te) to use an FP8 recipe")


@dataclass
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"  # offline runs sync later with `wandb sync`
    project: str = "keel"  # the wandb project
    progress: bool = True  # a live progress line on rank 0


for _name, _schema in (("run", RunConfig), ("train", TrainConfig), ("optim", OptimConfig),
                       ("parallel", ParallelConfig), ("precision", PrecisionConfig), ("logging", LoggingConfig)):
    register_section(_name, _schema)


@register_check
def check_training_data(cfg: Config) -> None:
    # A section registered with provides_data (rl: its prompts; recsys: its interaction log) names the
    # training data; every other recipe trains on data.sources.
    provided = any(getattr(cfg, s.name, None) is not None for s in SECTIONS.values() if s.provides_data)
    if not cfg.data.sources and not provided:
        raise ConfigError("data.sources: at least one data source is required")


@register_check
def check_layout(cfg: Config) -> None:
    """The family supports the requested model parallelisms, and the layout fits the model."""
    spec = get_model_spec(cfg.model.name)
    for dim in ("tp", "cp", "pp"):
        if getattr(cfg.parallel, dim) > 1 and dim not in spec.model_parallel:
            raise ConfigError(f"parallel.{dim}: the {spec.name} family does not support it yet; "
                              f"it trains with data parallelism (parallel.dp_shard / dp_replicate)")
    if cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel and not spec.tp_plan.sequence_parallel:
        raise ConfigError(f"parallel.sequence_parallel: the {spec.name} family's blocks cannot run on sequence "
                          f"shards yet; set it to false with parallel.tp")
    if cfg.parallel.pp > 1:
        validate_pipeline(cfg.parallel, cfg.model)
    if cfg.data.seq_len % (2 * cfg.parallel.cp):
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} must be divisible by 2 * parallel.cp "
                          f"= {2 * cfg.parallel.cp} (each cp rank holds two balanced chunks)")
    for key in ("n_heads", "n_kv_heads"):
        heads = getattr(cfg.model, key, None)
        if heads is not None and heads % cfg.parallel.tp:
            raise ConfigError(f"parallel.tp: {cfg.parallel.tp} does not divide model.{key} {heads}")


@register_check
def check_moe_layout(cfg: Config) -> None:
    """Expert parallelism needs experts to shard; MoE composes with data, tensor, pipeline and expert
    parallelism (ep not yet with cp, DDP alone or DeepSpeed; HSDP is fine)."""
    par, moe = cfg.parallel, getattr(cfg.model, "moe", None)
    if par.ep > 1 and moe is None:
        raise ConfigError(f"parallel.ep: {par.ep} needs a Mixture-of-Experts model (set model.moe)")
    if moe is None:
        return
    if par.compile:
        raise ConfigError("parallel.compile: not with model.moe yet (dropless routing sizes each expert's "
                          "batch on the host, which one fullgraph compiled block cannot hold); set it to false")
    if par.cp > 1 and moe.aux_loss_coef > 0:
        raise ConfigError(f"model.moe.aux_loss_coef: the sequence-level balance loss with parallel.cp = {par.cp} "
                          f"would see only this rank's share of each sequence; set it to 0 (the aux-loss-free "
                          f"bias still balances) or use parallel.cp 1")
    hidden = moe.expert_dim or cfg.model.ffn_dim
    if par.tp > 1 and hidden % par.tp:
        raise ConfigError(f"parallel.tp: {par.tp} does not divide the experts' width {hidden} "
                          f"(model.moe.expert_dim): tp splits every expert's width")
    if par.engine == "deepspeed" and moe.bias_update_rate > 0:
        raise ConfigError("model.moe.bias_update_rate: aux-loss-free balancing is not wired into the "
                          "deepspeed engine yet; set it to 0 or use parallel.engine torch")
    if par.ep == 1:
        return
    if moe.n_experts % par.ep:
        raise ConfigError(f"parallel.ep: {par.ep} does not divide model.moe.n_experts {moe.n_experts}")
    for key, bad in (("cp", par.cp > 1), ("engine", par.engine != "torch")):
        if bad:
            raise ConfigError(f"parallel.ep: expert parallelism with parallel.{key} = {getattr(par, key)} "
                              f"is not supported yet; it composes with parallel.dp_shard (FSDP2), tp and pp")
    if par.dp_shard != -1 and par.dp_shard % par.ep:
        raise ConfigError(f"parallel.ep: {par.ep} does not divide parallel.dp_shard {par.dp_shard} (experts are "
                          f"sharded inside FSDP2's shard groups; DDP alone does not take them)")


@register_check
def check_fp8_layout(cfg: Config) -> None:
    """Transformer Engine linears are plain modules to keel's TP plan and to torch's activation
    checkpointing: both would silently lose TE's FP8 state handling, so those combinations are refused."""
    par = cfg.parallel
    if cfg.precision.fp8 != "te":
        return
    if par.tp > 1:
        raise ConfigError(f"precision.fp8: te with parallel.tp = {par.tp} is not supported (torch's TP styles "
                          f"refuse TE linears); use precision.fp8=torchao, which composes with TP")
    if par.activation_checkpoint != "none":
        raise ConfigError(f"precision.fp8: te with parallel.activation_checkpoint = {par.activation_checkpoint} "
                          f"is not supported (the recompute would run outside fp8_autocast); use "
                          f"precision.fp8=torchao or parallel.activation_checkpoint=none")
