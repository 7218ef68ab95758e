"""Pipeline parallelism on torch.distributed.pipelining: the backbone cut into stages by layer and
driven by a schedule (GPipe, 1F1B, interleaved 1F1B) over the step's micro-batches.

Stages are cut from the whole model while it is still on the meta device: a rank keeps only its
stages' layers, plus the embedding on the first stage and the final norm + LM head on the last, and
materialises just those (keel/train/init.py draws the same initial weights one process would). A stage is a plain keel
model with parts removed: the backbone takes hidden states in place of token ids and hands its
activations on when it has no final norm. Parameter names are the full model's, so checkpoints
move freely between pp and every other layout.

Stages go to ranks loop-style: pp rank r holds stages r, r + pp, r + 2 pp, ... (one per rank for
GPipe / 1F1B, `parallel.pp_stages_per_rank` for interleaved 1F1B). Positions, document ids and
labels reach every stage as keyword arguments; the last stage computes the summed chunked loss
itself (logits never exist whole) and the schedule's loss function only scales it.

Tied embeddings: the first stage (embedding) and the last (LM head) each hold a copy of the table
and their gradients are summed after every backward (Megatron's embedding group), so the copies
stay identical and a checkpoint stores one.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from keel.errors import ConfigError
from keel.model.moe import MoEHooks

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

MULTI_STAGE_SCHEDULES = ("interleaved_1f1b",)


def _schedule_classes() -> dict:
    from torch.distributed.pipelining import schedules

    return {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B,
            "interleaved_1f1b": schedules.ScheduleInterleaved1F1B}


def stages_per_rank(cfg) -> int:
    if cfg.pp_stages_per_rank:
        return cfg.pp_stages_per_rank
    return 2 if cfg.pp_schedule in MULTI_STAGE_SCHEDULES else 1


def layers_per_stage(cfg, n_layers: int) -> list[int]:
    """Layers of each stage in stage order: `parallel.pp_layers`, or an even split whose
    remainder goes to the earliest stages (the last one also carries the LM head and loss)."""
    if cfg.pp_layers:
        return list(cfg.pp_layers)
    n_stages = cfg.pp * stages_per_rank(cfg)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def validate_pipeline(cfg, model_cfg) -> None:
    """Recipe-level checks of a pp layout (those needing the world size are in build_pipeline)."""
    if cfg.pp_stages_per_rank < 0:
        raise ConfigError(f"parallel.pp_stages_per_rank: must be >= 0, got {cfg.pp_stages_per_rank}")
    per_rank = stages_per_rank(cfg)
    if per_rank > 1 and cfg.pp_schedule not in MULTI_STAGE_SCHEDULES:
        raise ConfigError(f"parallel.pp_stages_per_rank: {per_rank} stages per rank need "
                          f"parallel.pp_schedule interleaved_1f1b; {cfg.pp_schedule} runs one stage per rank")
    n_stages, n_layers = cfg.pp * per_rank, model_cfg.n_layers
    if n_stages > n_layers:
        raise ConfigError(f"parallel.pp: {cfg.pp} ranks x {per_rank} stages per rank = {n_stages} stages, "
                          f"more than model.n_layers {n_layers}")
    if cfg.pp_layers is not None:
        layers = cfg.pp_layers
        if len(layers) != n_stages or min(layers) < 1 or sum(layers) != n_layers:
            raise ConfigError(f"parallel.pp_layers: expected {n_stages} positive layer counts summing to "
                              f"model.n_layers {n_layers}, got {layers}")


def stage_module(model: nn.Module, layer_names: list[str], first: bool, last: bool) -> nn.Module:
    """A copy of `model` that shares the kept layers, embedding, norm and head with it (no weight is
    copied) and drops the rest. A tied LM head on a last stage that is not also the first gets its
    own copy of the table."""
    tied_head = last and not first and model.output is None
    memo = {id(block): block for block in model.layers.values()}
    for module in (model.tok_embeddings, model.norm, model.output):
        if module is not None and not (tied_head and module is model.tok_embeddings):
            memo[id(module)] = module
    part = copy.deepcopy(model, memo)  # new containers; what is in memo is shared, not copied
    for name in [n for n in part.layers if n not in layer_names]:
        del part.layers[name]
    if not first and not tied_head:
        part.tok_embeddings = None
    if not last:
        part.norm = None
        part.output = None
    return part


class StageParts(MoEHooks, nn.Module):
    """This rank's stages seen as one module under the full model's parameter names, for the
    optimizer, gradient clipping, checkpoints and MoE balancing (of this rank's layers). It is never
    called: the schedule runs the stages."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.config = parts[0].config
        self.layers = nn.ModuleDict()
        for part in parts:
            for name, child in part.named_children():
                if name == "layers":
                    self.layers.update(child)
                elif child is not None and name not in self._modules:
                    self.add_module(name, child)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline-parallel model runs through keel.train.pipeline.Pipeline")


def _forget_moe_records_of_metadata_inference(stage: PipelineStage, part: nn.Module) -> None:
    """The schedule's first step runs each stage once more to infer shapes (torch's private
    `_forward_metadata_inference`: the first stage on a real micro-batch, later ones on empty
    tensors). MoE layers would count that pass's routing into the balancing load and hold its aux
    loss; both are dropped right after it. (Should torch rename the method, the MoE pp test fails.)"""
    infer = getattr(stage, "_forward_metadata_inference", None)
    if infer is None:
        return

    def forgetting(*args, **kwargs):
        out = infer(*args, **kwargs)
        for moe in part.moe_layers().values() if hasattr(part, "moe_layers") else ():
            moe.take_load()
            moe.aux_loss = None
        if hasattr(part, "take_carried_loss"):
            part.take_carried_loss()
        return out
    stage._forward_metadata_inference = forgetting


def _first_last_group(mesh, pp: int):
    """For each pipeline (a line along the pp mesh dim): a group of its first and last pp ranks."""
    mine = None
    for line in mesh.mesh.reshape(pp, -1).T.tolist():
        pair = sorted({line[0], line[-1]})
        group = dist.new_group(pair)  # every rank creates every group, in the same order
        if dist.get_rank() in pair:
            mine = group
    return mine


class Pipeline:
    def __init__(self, model: nn.Module, mesh, dims, cfg, n_microbatches: int,
                 parallelize_part: Callable[[nn.Module], nn.Module], device: torch.device):

        pcfg = cfg.parallel
        pp_mesh = mesh["pp"]
        self.group = pp_mesh.get_group()
        per_rank, pp_rank = stages_per_rank(pcfg), pp_mesh.get_local_rank()
        n_stages = dims.pp * per_rank
        counts = layers_per_stage(pcfg, model.config.n_layers)
        starts = [sum(counts[:i]) for i in range(n_stages + 1)]
        names = list(model.layers)
        tied = model.output is None
        import torch.distributed.pipelining as pipelining  # imports TorchDynamo: paid only with parallel.pp > 1

        self.parts, stages = [], []
        for stage_id in range(pp_rank, n_stages, dims.pp):
            first, last = stage_id == 0, stage_id == n_stages - 1
            part = parallelize_part(stage_module(model, names[starts[stage_id]:starts[stage_id + 1]], first, last))
            self.parts.append(part)
            stages.append(pipelining.PipelineStage(part, stage_id, n_stages, device, group=self.group))
            _forget_moe_records_of_metadata_inference(stages[-1], part)
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        if tied and self.has_last and not self.has_first:
            # The last stage's copy of the tied table takes the table's place in the whole model, so
            # initialising the whole model fills it with the embedding's initial values.
            model.tok_embeddings = self.parts[-1].tok_embeddings
        self.container = StageParts(self.parts)
        self.has_moe = bool(model.moe_layers()) if hasattr(model, "moe_layers") else False
        self.tied_group = _first_last_group(mesh, dims.pp) if tied else None
        self.n_microbatches = n_microbatches
        self.scale = 1.0
        self._losses: list[torch.Tensor] = []
        schedule_cls = _schedule_classes()[pcfg.pp_schedule]
        try:
            # scale_grads=False: keel scales every loss by 1 / (global token count) itself.
            self.schedule = schedule_cls(stages if pcfg.pp_schedule in MULTI_STAGE_SCHEDULES else stages[0],
                                         n_microbatches=n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        except ValueError as e:  # micro-batch counts a schedule cannot run
            raise ConfigError(f"train.global_batch: gives {n_microbatches} pipeline micro-batches per step "
                              f"(global_batch / (micro_batch x data-parallel ranks)); "
                              f"{pcfg.pp_schedule} says: {e}") from None

    def _loss_fn(self, loss_sum: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        self._losses.append(loss_sum.detach().float())
        return loss_sum * self.scale

    def _run(self, batch: dict, train: bool) -> torch.Tensor:
        """One schedule pass over `batch` (all micro-batches concatenated); the summed loss of
        every micro-batch, the same on every pp rank."""
        self._losses.clear()
        args = (batch["input_ids"],) if self.has_first else ()
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=batch["labels"], return_outputs=False, positions=batch["positions"],
            doc_ids=batch["doc_ids"], labels=batch["labels"])
        device = batch["labels"].device
        # The last n entries: a schedule's first pass also calls the loss on probe outputs.
        total = (torch.stack(self._losses[-self.n_microbatches:]).sum() if self.has_last
                 else torch.zeros((), device=device))
        for part in self.parts:  # MoE losses of the layers before the last stage (carried on activations)
            total = total + (part.take_carried_loss() if hasattr(part, "take_carried_loss") else 0)
        dist.all_reduce(total, group=self.group)
        return total

    def train_step(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """Forward + backward of the step's micro-batches; gradients hold d(scale * loss_sum)."""
        self.scale = scale
        for part in self.parts:  # a stage before the last carries its MoE losses on its activations
            part.aux_loss_scale = scale
        total = self._run(_concat(micro_batches), train=True)
        if self.tied_group is not None:
            weight = self.container.tok_embeddings.weight
            grad = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
            dist.all_reduce(grad, group=self.tied_group)
        return total

    def merge_stage_metrics(self, metrics: dict) -> dict:
        """Per-layer metrics (MoE loads) of every pp rank's layers, on every pp rank."""
        if not self.has_moe:
            return metrics
        gathered = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, metrics, group=self.group)
        return {k: v for part in gathered for k, v in part.items()}

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        """The summed loss over `batches`, in passes of the schedule's micro-batch count; the last
        pass is filled up with batches that carry no labels, so the result is the plain sum."""
        self.scale = 1.0
        filler = {**batches[-1], "labels": torch.full_like(batches[-1]["labels"], -100)}
        batches = batches + [filler] * (-len(batches) % self.n_microbatches)
        total = torch.zeros((), device=batches[0]["labels"].device)
        for i in range(0, len(batches), self.n_microbatches):
            total += self._run(_concat(batches[i:i + self.n_microbatches]), train=False)
        return total

    def norm_skip(self) -> set:
        """Parameters whose gradient another pp rank already counts in the global norm (the tied
        head's copy of the embedding on the last stage)."""
        if self.tied_group is not None and self.has_last and not self.has_first:
            return {id(self.container.tok_embeddings.weight)}
        return set()


def _concat(micro_batches: list[dict]) -> dict:
    return {key: torch.cat([mb[key] for mb in micro_batches]) for key in micro_batches[0]}


def build_pipeline(model, mesh, dims, cfg, parallelize_part, device, dp_size: int) -> Optional[Pipeline]:
    if dims.pp == 1:
        return None
    n_microbatches = cfg.train.global_batch // (cfg.train.micro_batch * dp_size)
    return Pipeline(model, mesh, dims, cfg, n_microbatches, parallelize_part, device)
