"""On-policy distillation (OPD) from one or more teachers, and CaMOPD (arXiv 2605.27115).

Method notes: docs/on-policy-distillation.md.

The student samples y ~ pi_s(.|x); the teacher routed to x (by PromptItem.source) scores the same
tokens; the student is pushed to lower the reverse KL(pi_s || pi_T). `rl.opd.signal` picks how:

  sampled     (default, the paper's MOPD loss) the per-token advantage A_t = log pi_T(y_t) - log pi_s(y_t),
              detached, in a policy gradient:  loss = -mean_t A_t log pi_s(y_t). Its gradient is the
              reverse KL's gradient on the sampled tokens, sum_t (log pi_s - log pi_T) grad log pi_s
              (the "-1" of d/dtheta of log pi_s has zero expectation). Discount 0: each token's
              advantage is its own gap, as in Thinking Machines' OPD. Needs only the teacher's
              log-prob of each sampled token, so any teacher tokenizer-compatible engine works.
  full_vocab  the analytic reverse KL at each sampled prefix, sum_v pi_s(v) (log pi_s(v) - log pi_T(v)),
              differentiated directly: lower variance, needs the teacher's whole next-token
              distribution (same vocabulary).

Both are token-mean over the (kept) response tokens.

CaMOPD adds two things, each a pure function below:
  - decoupled alternating schedule: n_g general-recovery steps, then 1 domain-review step, repeated;
    a step uses only its branch's prompts and loss (`AlternatingSchedule`);
  - gap-based selection: per sample, gap = mean_t |log pi_T(y_t) - log pi_s(y_t)|; only the top
    `keep_fraction` of the step's samples (at least one) carry loss (`select_by_gap`).
The keep ratio and n_g are not in the available text (n_g = 3 reads the paper's "3+1"): both are config
(docs/on-policy-distillation.md#choices-where-the-paper-is-silent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch

from keel.config import build_dataclass
from keel.errors import ConfigError, DataError
from keel.model.lora import LoRAConfig
from keel.rl.scoring import full_vocab_kl, response_logprobs


# ---------------------------------------------------------------- config
@dataclass
class CaMOPDConfig:
    n_general: int = 3  # general-recovery steps before each domain-review step
    keep_fraction: float = 0.5  # share of each step's samples kept by teacher-student gap; 1: all
    domain_prompts: dict = field(default_factory=dict)  # prompt source of the domain branch
    general_teacher: str = "general"  # teacher of the general-recovery branch (a key of rl.opd.teachers)
    domain_teacher: str = "domain"  # teacher of the domain-review branch


@dataclass
class OPDConfig:
    """rl.trainer opd: teachers, routing by prompt source, the signal, CaMOPD, optional LoRA."""
    # teacher name -> model (`smollm2`, an HF folder / .gguf, or a keel run / checkpoint), frozen.
    teachers: dict = field(default_factory=lambda: {"general": "smollm2"})
    routes: dict = field(default_factory=dict)  # PromptItem.source -> teacher name
    default_teacher: Optional[str] = None  # for sources without a route; None: unrouted is an error
    signal: Literal["sampled", "full_vocab"] = "sampled"  # distillation signal: the sampled tokens' log-ratio, or the exact reverse KL over the vocabulary
    camopd: Optional[CaMOPDConfig] = None  # None: plain (multi-teacher) OPD
    lora: Optional[LoRAConfig] = None  # train adapters only


def build_opd_config(raw) -> OPDConfig:
    cfg = raw if isinstance(raw, OPDConfig) else build_dataclass(OPDConfig, raw or {}, "rl.opd")
    if not cfg.teachers:
        raise ConfigError("rl.opd.teachers: at least one teacher (name: model path or `smollm2`)")
    for name, spec in cfg.teachers.items():
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"rl.opd.teachers.{name}: expected a model path or `smollm2`, got {spec!r}")
    named = sorted(cfg.teachers)
    for source, teacher in cfg.routes.items():
        if teacher not in cfg.teachers:
            raise ConfigError(f"rl.opd.routes.{source}: unknown teacher {teacher!r}; expected one of {named}")
    if cfg.default_teacher is not None and cfg.default_teacher not in cfg.teachers:
        raise ConfigError(f"rl.opd.default_teacher: unknown teacher {cfg.default_teacher!r}; expected one of {named}")
    if cfg.camopd is not None:
        c = cfg.camopd
        if c.n_general < 1:
            raise ConfigError(f"rl.opd.camopd.n_general: must be >= 1, got {c.n_general}")
        if not 0.0 < c.keep_fraction <= 1.0:
            raise ConfigError(f"rl.opd.camopd.keep_fraction: must be in (0, 1], got {c.keep_fraction}")
        if not c.domain_prompts:
            raise ConfigError("rl.opd.camopd.domain_prompts: required (the prompt source of the domain branch)")
        for key in ("general_teacher", "domain_teacher"):
            if getattr(c, key) not in cfg.teachers:
                raise ConfigError(f"rl.opd.camopd.{key}: unknown teacher {getattr(c, key)!r}; expected one of {named}")
    if cfg.lora is not None:
        cfg.lora.validate("rl.opd.lora")
    return cfg


# ---------------------------------------------------------------- routing and CaMOPD pieces
def route_teachers(sources: Sequence[str], routes: dict, default: Optional[str]) -> list[str]:
    """The teacher name of each sample, by its prompt's source."""
    out = []
    for source in sources:
        teacher = routes.get(source, default)
        if teacher is None:
            raise DataError(f"prompt source {source!r} has no teacher: add it to rl.opd.routes "
                            f"(routed sources: {sorted(routes)}) or set rl.opd.default_teacher")
        out.append(teacher)
    return out


@dataclass(frozen=True)
class AlternatingSchedule:
    """CaMOPD's decoupled schedule: steps 0..n_g-1 general, step n_g domain, then again. A pure
    function of the step, so a resumed run continues the cycle exactly where it stopped."""
    n_general: int

    def branch(self, step: int) -> str:
        return "domain" if step % (self.n_general + 1) == self.n_general else "general"


def gap_scores(student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample [B]: mean over its response tokens of |log pi_T(y_t) - log pi_s(y_t)|."""
    gap = (teacher_logps - student_logps).abs() * mask
    return gap.sum(-1) / mask.sum(-1).clamp(min=1)


def select_by_gap(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ceil(keep_fraction * B) highest-gap samples, at least one.
    Ties keep the earlier sample, so the choice is deterministic."""
    keep = max(1, math.ceil(keep_fraction * scores.numel() - 1e-9))
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


# ---------------------------------------------------------------- the signals
def reverse_kl_advantages(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantage -(log pi_s - log pi_T) on response tokens, 0 elsewhere, no gradient."""
    return ((teacher_logps - student_logps) * mask).detach()


def sampled_signal(student_logps, teacher_logps, mask, student_full=None, teacher_full=None) -> torch.Tensor:
    advantages = reverse_kl_advantages(student_logps, teacher_logps, mask)
    return -(advantages * student_logps)[mask.bool()]


def full_vocab_signal(student_logps, teacher_logps, mask, student_full=None, teacher_full=None) -> torch.Tensor:
    # The [N, V] rows are the response tokens in row-major order, as mask.bool() selects them.
    return full_vocab_kl(student_full, teacher_full)


# rl.opd.signal -> (student token logps [B, L], teacher token logps [B, L], response mask [B, L],
#                   student log-softmax [N, V] | None, teacher's | None) -> per-token loss [N]
# (N = response tokens, row-major). Callers sum and divide by the step's token count: token-mean.
OPD_SIGNALS: dict[str, Callable] = {"sampled": sampled_signal, "full_vocab": full_vocab_signal}
NEEDS_FULL_VOCAB = {"full_vocab"}


# ---------------------------------------------------------------- batches of student samples
@dataclass
class DistillBatch:
    input_ids: torch.Tensor  # [B, L] prompt + sampled response, right-padded
    response_mask: torch.Tensor  # [B, L] bool
    teachers: list[str]  # the routed teacher of each row

    def rows(self, index: Sequence[int]) -> "DistillBatch":
        idx = torch.tensor(list(index), dtype=torch.long)
        return DistillBatch(self.input_ids[idx], self.response_mask[idx], [self.teachers[i] for i in index])


def pack_rollouts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], teachers: list[str],
                  pad_id: int) -> DistillBatch:
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
        mask[i, len(p):len(p) + len(r)] = True
    return DistillBatch(ids, mask, list(teachers))


@torch.no_grad()
def teacher_scores(teachers: dict, batch: DistillBatch, full: bool = False, micro_batch: Optional[int] = None,
                   every_teacher: bool = False):
    """Teacher token logps [B, L] (each row under its own routed teacher) and, with `full`, the
    teachers' log-softmax rows [N, V] in the batch's row-major token order. Rows are scored
    `micro_batch` at a time (None: all of a teacher's rows at once), so a step's batch never has to
    fit one forward. `every_teacher`: a teacher no row is routed to scores row 0 anyway and the
    result is dropped — sharded teachers (FSDP) need every rank to run each one equally often."""
    token_logps = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)
    full_rows: list = [None] * len(batch.teachers)
    if every_teacher:
        for name in sorted(set(teachers) - set(batch.teachers)):
            first = batch.rows([0])
            response_logprobs(teachers[name], first.input_ids, first.response_mask, full)
    for name in sorted(set(batch.teachers)):
        mine = [i for i, t in enumerate(batch.teachers) if t == name]
        size = micro_batch or len(mine)
        for start in range(0, len(mine), size):
            rows = mine[start:start + size]
            sub = batch.rows(rows)
            lp, lp_full = response_logprobs(teachers[name], sub.input_ids, sub.response_mask, full)
            token_logps[torch.tensor(rows)] = lp.float()
            if full:
                for row, chunk in zip(rows, lp_full.split(sub.response_mask.sum(-1).tolist())):
                    full_rows[row] = chunk
    return token_logps, (torch.cat(full_rows) if full else None)


def student_scores(student: torch.nn.Module, batch: DistillBatch, micro_batch: int) -> torch.Tensor:
    """The student's token logps [B, L], `micro_batch` rows at a time."""
    parts = []
    for start in range(0, batch.input_ids.shape[0], micro_batch):
        rows = list(range(start, min(start + micro_batch, batch.input_ids.shape[0])))
        sub = batch.rows(rows)
        parts.append(response_logprobs(student, sub.input_ids, sub.response_mask)[0].float())
    return torch.cat(parts)


def distill_loss_sum(student: torch.nn.Module, teachers: dict, batch: DistillBatch, signal: str,
                     teacher_logps: Optional[torch.Tensor] = None, every_teacher: bool = False
                     ) -> tuple[torch.Tensor, dict]:
    """Sum over the batch's response tokens of the signal's per-token loss (the caller divides by
    the step's token count), and sums for the metrics. `every_teacher`: see teacher_scores."""
    full = signal in NEEDS_FULL_VOCAB
    student_logps, student_full = response_logprobs(student, batch.input_ids, batch.response_mask, full)
    teacher_full = None
    if teacher_logps is None or full:
        teacher_logps, teacher_full = teacher_scores(teachers, batch, full, every_teacher=every_teacher)
    mask = batch.response_mask.float()
    per_token = OPD_SIGNALS[signal](student_logps, teacher_logps, mask, student_full, teacher_full)
    gap = (student_logps.detach() - teacher_logps)[batch.response_mask]
    sums = {"reverse_kl_sampled": gap.sum().item(), "tokens": int(mask.sum())}
    if full:
        sums["reverse_kl_full"] = full_vocab_kl(student_full.detach(), teacher_full).sum().item()
    return per_token.sum(), sums
