"""`keel plan`: per-rank GPU memory of a recipe on a parallel layout, predicted without a GPU.

One training step is traced rather than estimated: the model is built under FakeTensorMode (tensors
with shapes and dtypes but no storage), parallelized by keel's own `parallelize` on a device mesh
whose process group is torch's fake one (every rank's collectives succeed locally), and one
micro-batch's forward and backward plus an optimizer step run under torch's memory trackers
(FSDPMemTracker under FSDP2, MemTracker otherwise), which see every tensor this rank would allocate.

What tracing cannot see is added analytically and said so in the notes column: the optimizer state
on top of the traced forward/backward peak (it only exists from the first step on), gradients held
across accumulated micro-batches, foreach optimizer temporaries, the in-flight micro-batches of a
pipeline schedule, and the loss chunk's logits (shown for reference; they are inside the traced peak).
The CUDA context, NCCL and allocator fragmentation (typically 1-3 GiB) are not modelled.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

# torch's private tracing tools (only the planner imports this module; fake_pg registers the "fake"
# process-group backend, under which every rank's collectives succeed locally).
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from keel.errors import ConfigError
from keel.model.registry import build_model, get_model_spec
from keel.train import parallel, precision
from keel.train.expert_parallel import build_ep_mesh
from keel.train.optim import build_optimizer

GIB = 2 ** 30
GPU_MEMORY_GIB = {"h100-80gb": 80, "h200-141gb": 141, "a100-80gb": 80, "cpu": None}

# The trackers' categories (their enum values), grouped into the table's rows.
PARAM_KINDS = ("Parameter", "Sharded Param", "Buffer")
GRAD_KINDS = ("Gradient", "Sharded Grad")
OPT_KINDS = ("Optstate", "OptState")
ACT_KINDS = ("Activation", "Temp", "Inputs", "Other")
COMM_KINDS = ("Unsharded Param", "All Gather", "Reduce Scatter", "Unsharded Grad")


@dataclass
class Row:
    name: str
    bytes: int
    how: str


@dataclass
class RankPlan:
    """The predicted memory of one kind of rank (every rank alike, or one pipeline stage)."""
    kind: str
    rows: list[Row]
    peak_bytes: int
    capacity_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.peak_bytes <= self.capacity_bytes


@dataclass
class MemoryPlan:
    recipe: str
    world: int
    layout: str
    gpu: str
    summary: str
    ranks: list[RankPlan]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for rank, plan in zip(out["ranks"], self.ranks):
            rank["fits"] = plan.fits
        return out


def gpu_capacity(gpu: str) -> int | None:
    if gpu not in GPU_MEMORY_GIB:
        raise ConfigError(f"--gpu: unknown GPU {gpu!r}; expected one of {sorted(GPU_MEMORY_GIB)}")
    size = GPU_MEMORY_GIB[gpu]
    return None if size is None else size * GIB


def plan_memory(cfg, world: int, gpu: str = "h100-80gb", recipe: str = "", task=None) -> MemoryPlan:
    """`task`: what one micro-batch runs (fake_batch, loss_sum, sample_shape); default the recipe's
    model family's training task. An RL recipe passes its trainer's step (keel/rl/plan.py)."""
    capacity = gpu_capacity(gpu)
    task = task or get_model_spec(cfg.model.name).task(cfg)
    if world < 1:
        raise ConfigError(f"--world: must be >= 1, got {world}")
    if cfg.parallel.engine != "torch":
        raise ConfigError(f"parallel.engine: keel plan traces the torch engine only, not {cfg.parallel.engine!r}")
    dims = parallel.resolve_parallel_dims(cfg.parallel, world)
    micro_total = cfg.train.micro_batch * dims.dp
    if cfg.train.global_batch % micro_total:
        raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                          f"train.micro_batch x data-parallel ranks = {micro_total}")
    if dist.is_initialized():
        raise ConfigError("keel plan runs in one process; do not launch it under torchrun")
    notes = []
    trace_cfg, trace_dims, in_flight = _pipeline_stage(cfg, dims, notes)
    if cfg.parallel.compile:
        trace_cfg.parallel.compile = False
        notes.append("parallel.compile: traced eagerly; compiled blocks usually need somewhat less")
    traced = _trace_or_fall_back(trace_cfg, trace_dims, notes, task=task)
    accumulation = cfg.train.global_batch // micro_total
    if _ddp_only(dims):
        traced["ddp_bucket_bytes"] = _sum(traced["after_step"], GRAD_KINDS)
    kind = "every rank" if dims.pp == 1 else f"pp stage (of {dims.pp}; {trace_cfg.model.n_layers} layers)"
    # What a task keeps beside the model all step long (an RL trainer's rollout engine, its reference)
    resident = task.resident_memory(cfg, traced["local_param_bytes"]) if hasattr(task, "resident_memory") else []
    rank = _rank_plan(kind, cfg, trace_cfg, traced, accumulation, in_flight, capacity, resident)
    if hasattr(task, "plan_notes"):  # what a task knows of its other phases (an RL trainer's rollouts)
        notes.extend(task.plan_notes(cfg, rank, capacity))
    if rank.peak_bytes and not rank.fits:
        notes.append(f"warning: {kind} needs {rank.peak_bytes / GIB:.1f} GiB, more than the {gpu}'s "
                     f"{capacity / GIB:.0f} GiB: raise parallel.dp_shard/tp/pp, lower "
                     f"{'rl' if cfg.rl is not None else 'train'}.micro_batch, "
                     f"or use parallel.activation_checkpoint")
    layout = " ".join(f"{name}={getattr(dims, name)}" for name in parallel.MESH_DIMS)
    n_params = cfg.model.num_params() if hasattr(cfg.model, "num_params") else None
    summary = (f"{cfg.model.name}" + (f", {n_params / 1e9:.2f} B parameters" if n_params else "")
               + f"; micro_batch {cfg.train.micro_batch} x {task.sample_shape()}, "
               + f"{accumulation} micro-batch"
               + ("es" if accumulation > 1 else "") + f" per step; {cfg.precision.dtype}"
               + (f", fp8 {cfg.precision.fp8}" if cfg.precision.fp8 != "off" else "")
               + f", activation_checkpoint {cfg.parallel.activation_checkpoint}, optim {cfg.optim.name}")
    return MemoryPlan(recipe, world, layout, gpu, summary, [rank], notes)


def _pipeline_stage(cfg, dims, notes: list):
    """(config, dims, micro-batches in flight) to trace. A pipeline's schedule cannot run on fake
    tensors in one process, so one stage is traced alone: its share of the layers, with both the
    embedding and the head (an upper bound for either end), on the stage's own data-parallel mesh."""
    trace_cfg = copy.deepcopy(cfg)
    if dims.pp == 1 and _ddp_only(dims):
        # DDP checks its replicas' shapes with a real collective, which fake weights cannot join; every
        # replica holds exactly what one process does, so one process is traced.
        notes.append(f"parallel.dp_replicate={dims.dp_replicate} (DDP): one replica traced as one process; "
                     f"DDP's gradient buckets (one more copy of the gradients) added analytically")
        return trace_cfg, parallel.ParallelDims(1, 1, 1, 1, 1), 1
    if dims.pp == 1:
        return trace_cfg, dims, 1
    trace_cfg.model.n_layers = math.ceil(cfg.model.n_layers / dims.pp)
    trace_cfg.parallel.pp = 1
    stage_dims = parallel.ParallelDims(1, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
    # 1F1B keeps up to pp micro-batches' activations on the first stage (GPipe: all of them).
    accumulation = cfg.train.global_batch // (cfg.train.micro_batch * dims.dp)
    in_flight = accumulation if cfg.parallel.pp_schedule == "gpipe" else min(dims.pp, accumulation)
    notes.append(f"parallel.pp={dims.pp}: one stage traced alone ({trace_cfg.model.n_layers} layers with "
                 f"embedding and head, an upper bound); activations x {in_flight} micro-batches in flight "
                 f"({cfg.parallel.pp_schedule}), analytic")
    return trace_cfg, stage_dims, in_flight


def _trace_or_fall_back(cfg, dims, notes: list, seq_split: int | None = None, task=None) -> dict:
    try:
        return _trace_step(cfg, dims, seq_split, task)
    except Exception as err:  # what does not trace on fake tensors is estimated, and said so
        if dims.tp > 1 or dims.cp > 1:
            return _trace_without_model_parallel(cfg, dims, err, notes, task)
        if cfg.precision.fp8 == "off":
            raise
        cfg.precision.fp8 = "off"  # FP8 tensor subclasses may not trace on fake tensors
        notes.append(f"precision.fp8: traced without FP8 ({type(err).__name__}); FP8 saves some activations")
        return _trace_or_fall_back(cfg, dims, notes, seq_split, task)


def _trace_without_model_parallel(cfg, dims, err: Exception, notes: list, task=None) -> dict:
    """Where TP or CP does not trace on fake tensors (FSDP over TP's DTensors asks for data-dependent
    shapes), trace FSDP alone over the same weight shards (dp_shard x cp) on this rank's sequence
    share, then divide what TP splits: the blocks' weights and, under sequence parallelism, roughly
    every activation but the loss chunk. Embeddings and the LM head stay whole, as keel's TP leaves them."""
    notes.append(f"parallel.tp={dims.tp} cp={dims.cp}: did not trace ({type(err).__name__}); FSDP over "
                 f"{dims.dp_shard * dims.cp} shards traced on 1/{dims.cp} of the sequence, block weights and "
                 f"activations divided by tp={dims.tp} (analytic, approximate; CP's ring K/V buffers not counted)")
    flat = parallel.ParallelDims(1, dims.dp_replicate, dims.dp_shard * dims.cp, 1, 1)
    traced = _trace_or_fall_back(cfg, flat, notes, seq_split=dims.cp, task=task)
    block_share = cfg.model.num_params(embeddings=False) / cfg.model.num_params()
    weights = block_share / dims.tp + (1 - block_share)
    acts = _sum(traced["peak"], ACT_KINDS)
    loss_chunk = _loss_chunk_bytes(cfg) if hasattr(cfg.model, "loss_chunk") else 0
    act_scale = (max(acts - loss_chunk, 0) / dims.tp + min(loss_chunk, acts)) / max(acts, 1)
    for key in ("peak", "after_step"):
        kinds = traced[key]
        for name in kinds:
            if name != "Total":
                kinds[name] = int(kinds[name] * (act_scale if name in ACT_KINDS else weights))
        kinds["Total"] = sum(v for k, v in kinds.items() if k != "Total")
    traced["local_param_bytes"] = int(traced["local_param_bytes"] * weights)
    traced["scaled"] = True
    return traced


def _ddp_only(dims) -> bool:
    return dims.dp_replicate > 1 and not parallel.uses_fsdp(dims) and dims.tp == 1


def _trace_step(cfg, dims, seq_split: int | None = None, task=None) -> dict:
    """Memory by tracker category, in bytes: `peak` of the forward+backward, `after_step` once the
    optimizer has stepped, and `local_param_bytes` (this rank's share of the weights)."""
    world = dims.world_size
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = parallel.build_mesh(dims, "cpu")
        ep = cfg.parallel.ep
        ep_mesh = build_ep_mesh(ep, dims.tp, "cpu", dims.pp) if ep > 1 and world > 1 else None
        # Nothing here allocates: under FakeTensorMode every tensor, weights included, is shape only.
        # Real tensors still reach ops: the device mesh's rank tables, which DTensor indexes (TP, CP).
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _trace_in_fake_mode(cfg, dims, mesh, seq_split or dims.cp, ep_mesh, task)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _trace_in_fake_mode(cfg, dims, mesh, seq_split: int, ep_mesh=None, task=None) -> dict:
    spec = get_model_spec(cfg.model.name)
    task = task or spec.task(cfg)
    fsdp = parallel.uses_fsdp(dims)
    model = build_model(cfg.model, "cpu")  # "cpu" under FakeTensorMode: fake weights, like the trainer's
    for module in model.modules():  # MoE: fake routing has no counts to split experts by; take them as balanced
        if hasattr(module, "planning"):
            module.planning = True
    precision.apply_fp8(model, cfg.precision, fsdp)
    param_dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" and fsdp else None
    model = parallel.parallelize(model, mesh, dims, cfg.parallel, spec.tp_plan, param_dtype, ep_mesh)
    optimizer, _ = build_optimizer(model, cfg.optim, cfg.train.steps)
    batch = task.fake_batch(cfg.train.micro_batch, seq_split)
    if fsdp:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((batch,))
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *batch.values())
    autocast = cfg.precision.dtype == "bf16" and not fsdp  # as the trainer: FSDP casts through its policy
    with tracker:
        with precision.forward_context(cfg.precision, torch.device("cpu"), autocast):
            loss = task.loss_sum(model, batch)
        loss.backward()
        peak = _by_kind(tracker.get_tracker_snapshot("peak"))
        # DTensor's sharding propagation for foreach kernels makes global-shape fake tensors that
        # the tracker counts; a per-parameter step allocates the same state without them.
        for group in optimizer.param_groups:
            if "foreach" in group:
                group["foreach"] = False
        optimizer.step()
        after_step = _by_kind(tracker.get_tracker_snapshot("current"))
    local = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    if fsdp and cfg.parallel.ep > 1:  # FSDP's tracker sees only the weights FSDP owns, not the experts
        experts = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters()
                      if "ep" in (getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None) or ()))
        for kinds in (peak, after_step):  # their weights, and gradients of the same dtype
            for name in ("Parameter", "Gradient", "Total"):
                kinds[name] = kinds.get(name, 0) + experts * (2 if name == "Total" else 1)
    return {"peak": peak, "after_step": after_step, "local_param_bytes": local}


def fake_batch(cfg, cp: int = 1) -> dict:
    """One micro-batch of the recipe's task, as this rank sees it (its sequence share under cp)."""
    return get_model_spec(cfg.model.name).task(cfg).fake_batch(cfg.train.micro_batch, cp)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _by_kind(snapshot: dict) -> dict:
    """{category name: bytes} summed over devices (everything is on the fake CPU device)."""
    out: dict = {}
    for per_device in snapshot.values():
        for kind, size in per_device.items():
            name = getattr(kind, "value", kind)
            out[name] = out.get(name, 0) + size
    return out


def _sum(kinds: dict, names) -> int:
    return sum(kinds.get(name, 0) for name in names)


def _rank_plan(kind: str, cfg, trace_cfg, traced: dict, accumulation: int, in_flight: int,
               capacity: int | None, resident: list = ()) -> RankPlan:
    peak, after = traced["peak"], traced["after_step"]
    params, grads, opt = _sum(after, PARAM_KINDS), _sum(after, GRAD_KINDS), _sum(after, OPT_KINDS)
    acts, comm = _sum(peak, ACT_KINDS), _sum(peak, COMM_KINDS) + traced.get("ddp_bucket_bytes", 0)
    # The first step's forward/backward ran before the optimizer state existed; every later one has it.
    fwbw_peak = peak.get("Total", 0) + opt + traced.get("ddp_bucket_bytes", 0)
    rows = [Row("parameters", params, "traced: this rank's share, storage dtype"),
            Row("gradients", grads, "traced: this rank's share")]
    if accumulation > 1:  # later micro-batches run with every gradient already held
        missing = grads - _sum(peak, GRAD_KINDS)
        fwbw_peak += missing
        rows[-1].how += f"; all held over {accumulation} micro-batches (+{missing / GIB:.2f} GiB at the peak)"
    rows.append(Row("optimizer state", opt, f"traced ({cfg.optim.name}, created by the first step)"))
    if in_flight > 1:
        fwbw_peak += (in_flight - 1) * acts
        acts *= in_flight
    rows.append(Row("activations (peak)", acts, "traced: forward+backward peak of one micro-batch"
                    + (f", x {in_flight} in flight (analytic)" if in_flight > 1 else "")))
    if hasattr(trace_cfg.model, "loss_chunk"):  # the LM families' chunked vocabulary loss
        rows.append(Row("  of which loss chunk", _loss_chunk_bytes(trace_cfg),
                        f"analytic: {min(trace_cfg.model.loss_chunk, cfg.train.micro_batch * cfg.data.seq_len)} "
                        f"tokens x {trace_cfg.model.vocab_size} vocab logits + fp32 grad"))
    rows.append(Row("communication buffers", comm, "analytic: DDP gradient buckets" if "ddp_bucket_bytes" in traced
                    else "traced: gathered (unsharded) weights and reduce-scatter inputs live at the peak"))
    # A foreach AdamW step holds one temporary per local weight (sqrt of the second moment): analytic.
    step_peak = params + grads + opt + traced["local_param_bytes"]
    for name, nbytes, how in resident:
        rows.append(Row(name, nbytes, how))
        fwbw_peak, step_peak = fwbw_peak + nbytes, step_peak + nbytes
    total = max(fwbw_peak, step_peak)
    rows.append(Row("total (peak)", total, "forward/backward peak with optimizer state"
                    + (" (the optimizer step is higher)" if step_peak > fwbw_peak else "")))
    if traced.get("scaled"):
        for row in rows:
            row.how = row.how.replace("traced", "scaled from a trace without tp/cp", 1)
    return RankPlan(kind, rows, total, capacity)


def _loss_chunk_bytes(cfg) -> int:
    """One chunk's logits in the compute dtype, their fp32 copy and its gradient (keel/model/loss.py)."""
    tokens = min(cfg.model.loss_chunk, cfg.train.micro_batch * cfg.data.seq_len)
    compute = 2 if cfg.precision.dtype == "bf16" else 4
    return tokens * cfg.model.vocab_size * (compute + 4 + 4 if compute == 2 else 8)


def format_plan(plan: MemoryPlan) -> str:
    capacity = GPU_MEMORY_GIB[plan.gpu]
    lines = [f"keel plan: {plan.recipe} on {plan.world} rank{'s' if plan.world > 1 else ''} "
             f"({plan.layout}), {plan.gpu}" + (f" ({capacity} GiB)" if capacity else ""),
             f"model: {plan.summary}"]
    for rank in plan.ranks:
        lines.append(f"{'per rank: ' + rank.kind:<34}{'GiB':>8}   how")
        for row in rank.rows:
            lines.append(f"  {row.name:<32}{row.bytes / GIB:>8.2f}   {row.how}")
        if rank.capacity_bytes:
            free = 1 - rank.peak_bytes / rank.capacity_bytes
            verdict = f"fits, {free:.0%} free" if rank.fits else "DOES NOT FIT"
            lines.append(f"  {'vs ' + plan.gpu:<32}{capacity:>8.2f}   {verdict}")
    lines += [f"note: {n}" for n in plan.notes if not n.startswith("warning:")]
    lines.append("note: the CUDA context, NCCL buffers and allocator fragmentation (often 1-3 GiB) are not included")
    lines += [n for n in plan.notes if n.startswith("warning:")]
    return "\n".join(lines)
