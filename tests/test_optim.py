"""Learning-rate schedules and gradient clipping against hand-computed values."""
import math

import pytest
import torch

from keel.train.config import OptimConfig
from keel.train.optim import build_optimizer, clip_grad_norm, lr_multiplier, param_groups


def test_cosine_with_warmup():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)  # first update: 1/10 of the peak
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly_to_the_floor():
    cfg = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[4] == 1.0 and values[5:80] == [1.0] * 75  # stable phase
    assert values[80] == pytest.approx(1 - 1 / 20) and values[99] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt, sched = build_optimizer(model, OptimConfig(lr=0.5, warmup_steps=2, schedule="constant"), 10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.25, 0.5, 0.5]


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(10, 4), "lin": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model["lin"].weight] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours = clip_grad_norm(a, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    assert clip_grad_norm(a, float("inf")).item() == pytest.approx(1.0, rel=1e-5)
