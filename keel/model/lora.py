"""LoRA (Hu et al. 2021), applied to a built model from the outside: the model files never know.

`apply_lora(model, cfg)` swaps every nn.Linear whose module name matches `cfg.targets` (a regex,
searched in names such as `layers.3.attention.wq`) for a LoRALinear that keeps the very same
`weight` / `bias` parameters, frozen, and adds `lora_a` [rank, in] and `lora_b` [out, rank]:

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T

B starts at zero, so a freshly adapted model computes exactly what the base computed. The base
keeps its parameter names (`...wq.weight`), and the state dict is the adapted model's: `weight`
holds W + delta (so a checkpoint read by `keel.load` or exported to HF is the trained model), with
the exact base in `base_weight` and the adapters in `lora_a` / `lora_b` for resuming.
`merged_state_dict(model)` has just the plain keys (HF export, pushing weights to a rollout
engine), `merge_lora` / `unmerge_lora` fold the adapters in place (faster inference), and
`adapters_disabled(model)` turns the model back into its base for the length of a `with` block
(DPO's reference and distillation's teacher without a second copy of the weights).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.errors import ConfigError


@dataclass
class LoRAConfig:
    rank: int = 8  # rank of the low-rank update B @ A
    alpha: float = 16.0  # scale: the update is multiplied by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input
    # A regex searched in each nn.Linear's module name; the default adapts queries and values.
    targets: str = r"attention\.(wq|wv)$"

    def validate(self, key: str = "lora") -> None:
        if self.rank <= 0:
            raise ConfigError(f"{key}.rank: must be > 0, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{key}.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout: must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"{key}.targets: not a valid regex ({e})") from None


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter beside its frozen weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 dropout: float, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoRAConfig) -> "LoRALinear":
        with torch.device("meta"):  # the base weight is reused, never allocated twice
            new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                      cfg.rank, cfg.alpha, cfg.dropout)
        new.weight, new.bias = linear.weight, linear.bias
        device, dtype = linear.weight.device, linear.weight.dtype
        new.lora_a = nn.Parameter(torch.empty(cfg.rank, linear.in_features, device=device, dtype=dtype))
        new.lora_b = nn.Parameter(torch.empty(linear.out_features, cfg.rank, device=device, dtype=dtype))
        new.reset_lora_parameters()
        return new

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        # PEFT's init: A like nn.Linear's default, B zero, so the adapter starts as a no-op.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            if not self.adapter_enabled:
                raise RuntimeError("LoRA adapters are merged into the weights; unmerge before disabling them")
            return out
        if not self.adapter_enabled:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    @property
    def base_weight(self) -> torch.Tensor:
        """W without the adapter (also the name DCP looks the state-dict entry up by)."""
        return self.weight - self.delta_weight().detach().to(self.weight.dtype) if self.merged else self.weight

    # The state dict is the adapted model's: `weight` holds W + delta, so keel.load / HF export of
    # the plain architecture give the trained model, and the exact base W rides along as
    # `base_weight`, so a resumed run continues bit for bit (W + delta - delta is not W in floats).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            delta = self.delta_weight().to(self.weight.dtype)
            live = self.weight if keep_vars else self.weight.detach()
            if self.merged:
                destination[prefix + "base_weight"] = live - delta
            else:
                destination[prefix + "weight"] = live + delta
                destination[prefix + "base_weight"] = live

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "base_weight"
        # Cloned first: the entry may be this very parameter (DCP loads in place), which the
        # plain load below overwrites with W + delta.
        base = state_dict[key].detach().clone() if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if base is not None:  # else a plain state dict: its weight is the base
            with torch.no_grad():
                self.weight.copy_(base)
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if key in state_dict or prefix + "weight" in state_dict:
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def apply_lora(model: nn.Module, cfg: LoRAConfig, key: str = "lora") -> list[str]:
    """Adapt every nn.Linear whose name matches cfg.targets; freeze everything else.
    Returns the adapted module names. No match is a ConfigError naming `{key}.targets`."""
    cfg.validate(key)
    pattern = re.compile(cfg.targets)
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) is nn.Linear and pattern.search(name)]
    if not chosen:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(f"{key}.targets: {cfg.targets!r} matches no nn.Linear module; names look like "
                          f"{linears[:3]}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(linear, cfg))
    return [name for name, _ in chosen]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the length of the block (adapters skipped, not removed)."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.adapter_enabled = was


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted model's state dict with the keys and shapes of the un-adapted model (adapters
    folded into the weights): for HF export and rollout-engine weight sync. The model is untouched."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b", ".base_weight"))}
