"""FP8 post-training quantisation for serving (OneRec-V2's recipe, applied to any family's blocks).
It lives beside its exporter, not in keel/model: model files stay single-precision, plain PyTorch.

Round-to-nearest E4M3, nothing calibrated: weights offline per output channel with an fp32 scale
(amax / 448), activations per token at run time, the GEMM in FP8 with fp32 accumulation and the
result cast back to the activation dtype. Only the linears inside `model.layers` (attention q/k/v/o,
cross-attention q/o, dense FFN, MoE experts) are quantised, and only those with at least
`min_features` input and output features; embeddings, norms, routers, heads and the context
processor stay in their own precision (sensitive or small).

On a CUDA device with bf16 activations the GEMM is `torch._scaled_mm` (rowwise scales, H100); every
other device runs an exact emulation: the FP8 values and their scales dequantised to fp32 and
multiplied in fp32, which is what the tensor cores compute up to the order of the fp32 sums.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.model.moe import GroupedExperts

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# E4M3 keeps 3 mantissa bits: round-to-nearest is within half a step, 2^-4 of the value, for normal
# numbers; below the smallest normal (2^-6 after scaling) the absolute step 2^-9 bounds the error.
RELATIVE_ERROR_BOUND, SUBNORMAL_STEP = 2.0 ** -4, 2.0 ** -9
# Linears that stay in their precision whatever their size: an MoE router's scores pick experts, and
# a rounding flip there changes the computation rather than perturbing it.
KEPT = ("router",)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, fp32 scales [..., 1]) with one scale per row (last dimension): x ~ q * scale."""
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T with W = weight_q [out, in] * weight_scale [out, 1]; x quantised per token."""
    shape = x.shape
    x_q, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    if x.is_cuda and x.dtype == torch.bfloat16:
        out = torch._scaled_mm(x_q, weight_q.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)
    else:  # exact emulation: FP8 products are exact in fp32, sums accumulate in fp32
        out = F.linear(x_q.float() * x_scale, weight_q.float() * weight_scale).to(x.dtype)
    return out.reshape(*shape[:-1], -1)


class FP8Linear(nn.Module):
    """A bias-free linear whose weight is stored as E4M3 per output channel."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        module = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        if linear.weight.device.type != "meta":
            module.weight_q, module.weight_scale = quantize_rows(linear.weight)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight_q, self.weight_scale)


class FP8GroupedExperts(nn.Module):
    """GroupedExperts with each expert's matrices quantised per output channel (the paper uses 128x128
    weight blocks for its MoE GEMM; per channel is the same scheme at a finer grain)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        for name in ("w1", "w3", "w2"):
            weight = getattr(experts, name)
            q = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            scale = torch.empty(*weight.shape[:2], 1, dtype=torch.float32, device=weight.device)
            if weight.device.type != "meta":
                q, scale = quantize_rows(weight)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        for e, chunk in enumerate(x_sorted.split(counts)):
            gate = fp8_linear(chunk, self.w1_q[e], self.w1_scale[e])
            up = fp8_linear(chunk, self.w3_q[e], self.w3_scale[e])
            outs.append(fp8_linear(F.silu(gate) * up, self.w2_q[e], self.w2_scale[e]))
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.w2_q.shape[1])


def quantize_for_serving(model: nn.Module, min_features: int = 0) -> list[str]:
    """Swap the block linears and experts of `model.layers` for FP8 ones, in place (weights
    quantised now, or only the structure on the meta device). Returns the quantised module names."""
    done = []
    for name, module in list(model.layers.named_modules(prefix="layers")):
        for child_name, child in list(module.named_children()):
            if child_name in KEPT:
                continue
            if isinstance(child, nn.Linear) and child.bias is None and \
                    min(child.in_features, child.out_features) >= min_features:
                setattr(module, child_name, FP8Linear.from_linear(child))
            elif isinstance(child, GroupedExperts):
                setattr(module, child_name, FP8GroupedExperts(child))
            else:
                continue
            done.append(f"{name}.{child_name}")
    return done
