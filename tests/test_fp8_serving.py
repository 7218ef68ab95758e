"""FP8 (E4M3) post-training quantisation for serving: the per-channel rounding error bound, the GEMM
emulation against its definition, and a quantised MoE block against the float one."""
import torch

from keel.checkpoint.fp8_serving import (
    FP8,
    RELATIVE_ERROR_BOUND,
    SUBNORMAL_STEP,
    FP8Linear,
    fp8_linear,
    quantize_for_serving,
    quantize_rows,
)
from keel.model.moe import MoEConfig, MoEFeedForward


def test_per_channel_rounding_error_is_within_e4m3s_bound():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: each gets its own scale
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 2, 64).unsqueeze(1)
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(1), torch.full((64,), 448.0))  # each row's amax maps to E4M3's max
    err = (q.float() * scale - w).abs()
    bound = torch.maximum(RELATIVE_ERROR_BOUND * w.abs(), SUBNORMAL_STEP * scale)
    assert (err <= bound * (1 + 1e-6)).all()
    assert float((err / w.abs().clamp_min(1e-30)).median()) < RELATIVE_ERROR_BOUND / 2


def test_fp8_linear_is_the_dequantised_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 5, 32, generator=g), torch.randn(16, 32, generator=g)
    w_q, w_s = quantize_rows(w)
    x_q, x_s = quantize_rows(x.reshape(-1, 32))
    want = ((x_q.float() * x_s) @ (w_q.float() * w_s).T).reshape(3, 5, 16)
    torch.testing.assert_close(fp8_linear(x, w_q, w_s), want, rtol=0, atol=0)
    rel = (fp8_linear(x, w_q, w_s) - x @ w.T).norm() / (x @ w.T).norm()
    assert rel < 2 * RELATIVE_ERROR_BOUND  # two operands rounded, errors mostly cancel in the sums


def test_quantised_moe_block_tracks_the_float_one():
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, expert_dim=32, expert_compute="loop")
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleDict({"0": MoEFeedForward(64, 128, cfg)})
    holder.layers["0"].init_weights(0.02, 0.02)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        want = holder.layers["0"](x)
        names = quantize_for_serving(holder)
        got = holder.layers["0"](x)
    assert "layers.0.experts" in names and any("shared" in n for n in names)
    assert not any(isinstance(m, FP8Linear) for m in holder.layers["0"].router.modules())  # the router stays
    assert float((got - want).norm() / want.norm()) < 0.1
