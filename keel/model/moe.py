"""Mixture-of-Experts feed-forward for the backbone's blocks. Single-device code only.

Routing: a linear router scores every expert (softmax or sigmoid), each token takes its top-k
experts, dropless (no capacity factor: an expert takes every token routed to it). DeepSeek-V3's
aux-loss-free balancing adds a per-expert bias to the scores for *selection only*; the bias is a
buffer moved outside the gradient by `update_balance()` (the trainer calls the model's
`update_moe_balance()` after each optimizer step). Optional DeepSeek-V3 sequence-level aux loss and
router z-loss are added to the LM loss by the backbone.

Expert weights are 3-D parameters [E, out, in] (the per-expert nn.Linear layout stacked), so names
do not depend on the layout; keel/train/expert_parallel.py shards dim 0 over the ep ranks by
swapping `GroupedExperts.forward` for an all-to-all version. The expert matmuls run as one grouped
GEMM (`torch._grouped_mm`, on CPU and CUDA) over tokens sorted by expert; `expert_ffn_loop` is the
plain reference (a Python loop over experts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError


@dataclass
class MoEConfig:
    n_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 0  # always-on experts (one dense SwiGLU of n_shared * expert_dim)
    expert_dim: int = 0  # hidden width of one expert; 0: model.ffn_dim
    first_dense_layers: int = 0  # the first k layers keep a dense FFN (DeepSeek-V3: 3)
    layers: Optional[list[int]] = None  # an explicit list of MoE layers (overrides first_dense_layers)
    router: Literal["softmax", "sigmoid"] = "softmax"  # Qwen3-MoE: softmax; DeepSeek-V3: sigmoid
    norm_topk: bool = True  # renormalise the k selected weights to sum to 1
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (DeepSeek-V3: 1e-3); 0: off
    aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-level balance loss weight; 0: off
    z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE); 0: off
    expert_compute: Literal["grouped_mm", "loop"] = "grouped_mm"  # loop: the plain reference

    def validate(self, n_layers: int) -> None:
        for key in ("n_experts", "top_k"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.moe.{key}: must be > 0, got {getattr(self, key)}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.moe.top_k: {self.top_k} exceeds model.moe.n_experts {self.n_experts}")
        for key in ("n_shared_experts", "expert_dim", "first_dense_layers", "bias_update_rate",
                    "aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}: must be >= 0, got {getattr(self, key)}")
        bad = [i for i in (self.layers or []) if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"model.moe.layers: {bad} outside 0..{n_layers - 1}")

    def is_moe_layer(self, index: int) -> bool:
        return index in self.layers if self.layers is not None else index >= self.first_dense_layers

    def moe_layer_count(self, n_layers: int) -> int:
        return sum(self.is_moe_layer(i) for i in range(n_layers))


# ------------------------------------------------------------------ expert matmuls
def expert_ffn_loop(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """SwiGLU per expert on tokens sorted by expert (`counts[e]` rows each): the reference."""
    outs = [F.linear(F.silu(F.linear(chunk, w1[e])) * F.linear(chunk, w3[e]), w2[e])
            for e, chunk in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


def expert_ffn_grouped(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """The same as one grouped GEMM per projection (torch._grouped_mm takes [E, in, out] weights)."""
    offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    gate = torch._grouped_mm(x, w1.transpose(1, 2), offs=offsets)
    up = torch._grouped_mm(x, w3.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights; forward(tokens sorted by expert, per-expert counts)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, compute: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # down
        grouped = compute == "grouped_mm" and hasattr(torch, "_grouped_mm")
        self.ffn = expert_ffn_grouped if grouped else expert_ffn_loop
        self.planning = False  # set by keel plan (fake tensors): the meta kernel of _grouped_mm takes bf16 only

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return self.compute(x_sorted, counts, self.w1, self.w3, self.w2)

    def compute(self, x_sorted: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
        """The experts on given weights (a parallel layout passes its local slices)."""
        return (expert_ffn_loop if self.planning else self.ffn)(x_sorted, counts, w1, w3, w2)


class SharedExperts(nn.Module):
    """Always-on experts, fused into one SwiGLU (DeepSeek's shared experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ------------------------------------------------------------------ the layer
class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.planning = False  # set by keel plan, which traces on fake tensors (keel/train/plan.py)
        hidden = cfg.expert_dim or ffn_dim
        self.router = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.n_experts, dim, hidden, cfg.expert_compute)
        self.shared = SharedExperts(dim, cfg.n_shared_experts * hidden) if cfg.n_shared_experts else None
        # Selection-only bias (aux-loss-free balancing): persistent, so a resume continues exactly.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.tokens_per_expert: Optional[torch.Tensor] = None  # summed since the last balance update
        self.aux_loss: Optional[torch.Tensor] = None  # this forward's weighted aux + z loss (per token)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.router.weight, self.experts.w1, self.experts.w3):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.experts.w2, std=out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.w1.weight, std=std)
            nn.init.normal_(self.shared.w3.weight, std=std)
            nn.init.normal_(self.shared.w2.weight, std=out_std)
        self.expert_bias.zero_()

    def route(self, x: torch.Tensor):
        """(router logits [T, E] fp32, scores [T, E], top-k expert ids [T, k], their weights [T, k])."""
        logits = self.router(x).float()
        scores = logits.softmax(-1) if self.cfg.router == "softmax" else logits.sigmoid()
        # The bias steers which experts are chosen, never how much they weigh (and takes no gradient).
        chosen = torch.topk(scores.detach() + self.expert_bias, self.cfg.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.cfg.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)
        logits, scores, chosen, weights = self.route(tokens)
        n_experts = self.cfg.n_experts
        if self.planning:  # fake tensors have no values to count: take the routing as balanced
            even, extra = divmod(chosen.numel(), n_experts)
            split = [even + (e < extra) for e in range(n_experts)]
            counts = torch.tensor(split, device=x.device)
        else:
            counts = torch.bincount(chosen.flatten(), minlength=n_experts)
            split = counts.tolist()
        out = self.mix_experts(tokens, chosen, weights, split)
        self._record(counts.detach(), logits, scores, chosen, batch, seq)
        return out.view(batch, seq, dim)

    def mix_experts(self, tokens: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                    split: list[int]) -> torch.Tensor:
        """The chosen experts' outputs weighted by the router, plus the shared experts'. Everything
        here is linear in the experts' outputs, so tensor parallelism can split the experts' width
        and sum this method's output over ranks (keel/train/moe_tensor_parallel.py wraps it)."""
        # Dropless: every (token, expert) pair is computed, grouped by expert.
        order = torch.argsort(chosen.flatten(), stable=True)
        source_token = order // self.cfg.top_k
        out_sorted = self.experts(tokens[source_token], split)
        out_sorted = out_sorted * weights.flatten()[order, None].to(out_sorted.dtype)
        out = torch.zeros_like(tokens).index_add_(0, source_token, out_sorted.to(tokens.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out

    def _record(self, counts, logits, scores, chosen, batch: int, seq: int) -> None:
        if self.training:
            self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        aux = logits.new_zeros(())
        if self.cfg.aux_loss_coef and self.training:
            # DeepSeek-V3 eq. 17-20, per sequence: E/(k L) * sum_e f_e * P_e, averaged over sequences.
            n_experts, k = self.cfg.n_experts, self.cfg.top_k
            probs = scores / scores.sum(-1, keepdim=True)
            picked = F.one_hot(chosen, n_experts).sum(1).view(batch, seq, n_experts).float()
            f = picked.sum(1) * n_experts / (k * seq)
            p = probs.view(batch, seq, n_experts).mean(1)
            aux = aux + self.cfg.aux_loss_coef * (f * p).sum(-1).mean()
        if self.cfg.z_loss_coef and self.training:
            aux = aux + self.cfg.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean()
        self.aux_loss = aux

    @torch.no_grad()
    def update_balance(self, load: torch.Tensor) -> None:
        """DeepSeek-V3: b_e += rate * sign(mean load - load_e) (under-loaded experts rise)."""
        load = load.float()
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)

    def take_load(self) -> torch.Tensor:
        """Tokens per expert since the last call (zeros if none), and reset."""
        load = self.tokens_per_expert
        self.tokens_per_expert = None
        return load if load is not None else torch.zeros_like(self.expert_bias, dtype=torch.int64)


def moe_flops_params(dim: int, ffn_dim: int, cfg: MoEConfig) -> tuple[int, int]:
    """(all parameters, active parameters per token) of one MoE feed-forward."""
    hidden = cfg.expert_dim or ffn_dim
    expert = 3 * dim * hidden
    router = dim * cfg.n_experts
    shared = cfg.n_shared_experts * expert
    return cfg.n_experts * expert + router + shared, cfg.top_k * expert + router + shared


def load_imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert (1.0: perfectly balanced)."""
    load = load.float()
    return float(load.max() / load.mean().clamp_min(1e-9)) if load.numel() else math.nan


class _CarryLossTerm(torch.autograd.Function):
    """Identity on the activations; in the backward the loss term gets gradient `scale`, as if it had
    been added to a loss that is multiplied by `scale` (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, h, term, scale: float):
        ctx.scale = scale
        ctx.term_like = (term.shape, term.dtype, term.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.term_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class MoEHooks:
    """What the trainer calls on a model with MoE blocks in `self.layers` (a mixin for model classes)."""

    # The factor the final loss is multiplied by before its backward. Only a pipeline stage before
    # the last needs it (it returns activations, not a loss); keel/train/pipeline.py sets it.
    aux_loss_scale = 1.0
    carried_loss = None  # the values of the loss terms carried on activations (carry_moe_aux_loss)

    def carry_moe_aux_loss(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Where the loss is computed further on (a pipeline stage before the last), this part's MoE
        losses ride on its output activations: their gradient arrives in the backward as if they
        had joined the loss here, weighted by the batch's loss tokens like the last stage's."""
        aux = self.take_moe_aux_loss()
        if not torch.is_tensor(aux) or labels is None or not aux.requires_grad:
            return h
        term = aux * (labels != -100).sum()
        self.carried_loss = term.detach().float() + (self.carried_loss if self.carried_loss is not None else 0)
        return _CarryLossTerm.apply(h, term, self.aux_loss_scale)

    def take_carried_loss(self):
        """The loss terms carried since the last call (0 without any), for the reported loss."""
        carried, self.carried_loss = self.carried_loss, None
        return carried if carried is not None else 0

    def moe_layers(self) -> dict[str, MoEFeedForward]:
        # named_modules sees through activation-checkpoint wrappers ("layers.3._checkpoint_wrapped_module...")
        return {name.split(".")[1]: m for name, m in self.layers.named_modules(prefix="layers")
                if isinstance(m, MoEFeedForward)}

    def take_moe_aux_loss(self):
        """The MoE layers' auxiliary losses of the last forward, summed (0 without any). Taken once:
        holding them would keep that forward's graph alive."""
        total = 0
        for moe in self.moe_layers().values():
            if moe.aux_loss is not None:
                total = total + moe.aux_loss
                moe.aux_loss = None
        return total

    def update_moe_balance(self, reduce=None) -> None:
        """After an optimizer step: aux-loss-free bias update from the tokens each expert took.
        `reduce` sums a tensor over the data-parallel ranks (the caller's; model code has no ranks)."""
        self._moe_stats = {}
        for layer, moe in self.moe_layers().items():
            load = moe.take_load()
            if reduce is not None:
                load = reduce(load)
            moe.update_balance(load)
            self._moe_stats[f"moe_load_max_mean/{layer}"] = load_imbalance(load)
            self._moe_stats[f"moe_bias_norm/{layer}"] = float(moe.expert_bias.norm())

    def moe_metrics(self) -> dict:
        """Per MoE layer: max/mean tokens per expert in the last step, and the balancing bias norm."""
        return dict(getattr(self, "_moe_stats", {}))
