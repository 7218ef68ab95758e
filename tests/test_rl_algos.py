"""Advantage estimators and policy losses against hand-computed numbers (keel.rl.advantages / losses)."""
import dataclasses
import math
import random

import pytest
import torch

from conftest import REPO
from keel.errors import ConfigError
from keel.rl.advantages import compute_advantages
from keel.rl.losses import entropy_from_logits, kl_penalty, policy_loss, truncated_is_weights

EPS = 1e-6


def close(actual, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=tol), (actual, expected)


# --------------------------------------------------------------------------------------- grpo

def test_grpo_group_mean_std_singleton_and_all_equal():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    tasks = ["t"] * 8
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.577350 -> +-0.5 / 0.577350 = +-0.866025
    # group 1: all equal -> 0; group 2 (one rollout, no baseline) -> 0 by default
    adv = compute_advantages("grpo", rewards, group, tasks, {}, {})
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0])
    assert torch.isfinite(adv).all()
    # Dr. GRPO: no division by std
    close(compute_advantages("grpo", rewards, group, tasks, {"norm_by_std": False}, {}),
          [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # verl's size-1 rule: mean 0, std 1
    close(compute_advantages("grpo", rewards, group, tasks, {"singleton": "reference"}, {})[-1], 0.5 / (1 + EPS))
    # mean 1, unbiased std 1
    close(compute_advantages("grpo", torch.tensor([2.0, 0.0, 1.0]), torch.tensor([7, 7, 7]), ["t"] * 3),
          [1 / (1 + EPS), -1 / (1 + EPS), 0.0])


# ------------------------------------------------------------------------------- tmn_reweight

def test_tmn_reweight_hand_computed():
    # task a: g0 = [1,0,0,0] (mu .25, var .25), g1 = [1,1,0,1] (mu .75, var .25) -> s_a = sqrt(.25) = .5
    #   m_a = .5; smoothed means (alpha .8): g0 .3 -> pass 1/4; g1 .7 -> pass 3/4
    #   g0: r=1: (.75/.5) * exp(.5-.25) = 1.5 * 1.284025 = 1.926038;  r=0: (-.25/.5) * exp(-.25) = -0.389400
    #   g1: r=1: (.25/.5) * exp(-.25) = 0.389400;  r=0: (-.75/.5) * exp(.25) = -1.926038
    # task b: one rollout r=.4: mu 0, var 1 -> s_b = 1; m_b = 0 -> pass 1; positive -> .4 * exp(-.5) = .242612
    # task c: all equal -> s_c = 0 -> 0 / (0 + eps) = 0
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1, 0.4, 1, 1, 1])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3])
    tasks = ["a"] * 8 + ["b"] + ["c"] * 3
    state = {}
    adv = compute_advantages("tmn_reweight", rewards, group, tasks, {}, state)
    close(adv, [1.926038, -0.389400, -0.389400, -0.389400, 0.389400, 0.389400, -1.926038, 0.389400,
                0.242612, 0, 0, 0])
    assert state["metrics"]["adv/task_scale/a"] == pytest.approx(0.5)
    # without reweighting: centred per prompt, scaled per task
    close(compute_advantages("tmn_reweight", rewards, group, tasks, {"difficulty_reweight": False}),
          [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5, 0.4, 0, 0, 0])
    close(compute_advantages("tmn_reweight", rewards, group, tasks, {"singleton": "zero"})[8], 0.0)


def _tmn_by_loops(rewards, group, tasks, alpha, gamma, eps=1e-6):
    """TMN-Reweight (docs/grpo.md#tmn-reweight-estimator) written out with plain Python lists,
    independent of the tensor implementation."""
    groups = {}
    for i, g in enumerate(group):
        groups.setdefault(g, []).append(i)
    mu, var, task_of = {}, {}, {}
    for g, idx in groups.items():
        rs = [rewards[i] for i in idx]
        task_of[g] = tasks[idx[0]]
        if len(rs) == 1:
            mu[g], var[g] = 0.0, 1.0
        else:
            m = sum(rs) / len(rs)
            mu[g], var[g] = m, sum((r - m) ** 2 for r in rs) / (len(rs) - 1)
    scale, m_t = {}, {}
    for t in set(tasks):
        gs = [g for g in groups if task_of[g] == t]
        scale[t] = math.sqrt(sum(var[g] for g in gs) / len(gs))
        m_t[t] = sum(mu[g] for g in gs) / len(gs)
    out = [0.0] * len(rewards)
    for g, idx in groups.items():
        t = task_of[g]
        smooth = m_t[t] if len(idx) == 1 else alpha * mu[g] + (1 - alpha) * m_t[t]
        p = sum(rewards[i] > smooth for i in idx) / len(idx)
        for i in idx:
            a = (rewards[i] - mu[g]) / (scale[t] + eps)
            out[i] = a * (math.exp(gamma * (0.5 - p)) if rewards[i] > mu[g] else math.exp(gamma * (p - 0.5)))
    return out


def test_tmn_reweight_matches_loop_reference_on_random_batches():
    rng = random.Random(0)
    for trial in range(5):
        group, tasks, rewards = [], [], []
        for g in range(12):
            size = rng.choice([1, 2, 4, 8])
            task = rng.choice(["em", "f1", "math"])
            for _ in range(size):
                group.append(g * 3 + 1)  # non-contiguous ids
                tasks.append(task)
                rewards.append(rng.choice([0.0, 0.25, 1.0, rng.random()]))
        alpha, gamma = rng.choice([0.5, 0.8]), rng.choice([1.0, 2.0])
        adv = compute_advantages("tmn_reweight", torch.tensor(rewards), torch.tensor(group), tasks,
                                 {"difficulty_smooth_alpha": alpha, "difficulty_gamma": gamma})
        close(adv, _tmn_by_loops(rewards, group, tasks, alpha, gamma), tol=1e-4)


def test_estimator_options_from_a_recipe_dataclass():
    """A recipe section is a dataclass that may hold options of several estimators, with short aliases."""
    @dataclasses.dataclass
    class Section:
        eps: float = 1e-6
        norm_by_std: bool = True
        difficulty_alpha: float = 0.5
        difficulty_gamma: float = 2.0

    rewards, group, tasks = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0] * 4 + [1] * 4, ["a"] * 8
    adv = compute_advantages("tmn_reweight", torch.tensor(rewards), torch.tensor(group), tasks, Section())
    close(adv, _tmn_by_loops(rewards, group, tasks, alpha=0.5, gamma=2.0))


def test_estimator_bad_names():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ConfigError, match=r"rl.advantage: unknown advantage estimator 'grpoo' \(did you mean 'grpo'\?\)"):
        compute_advantages("grpoo", r, g, ["t", "t"])
    with pytest.raises(ConfigError, match=r"rl.advantage.difficulty_gama: .*did you mean 'difficulty_gamma'"):
        compute_advantages("tmn_reweight", r, g, ["t", "t"], {"difficulty_gama": 2.0})


# --------------------------------------------------------------------------------------- losses

def _ppo_batch():
    # old logprobs 0, so ratio = exp(logprob). Row 0 has A = +1, row 1 A = -1.
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 5.0]])
    logprobs = ratios.log().requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return logprobs, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_ppo_clip_asymmetric_and_dual_clip_hand_values():
    logprobs, old, adv, mask = _ppo_batch()
    # per-token loss max(-A r, -A clip(r, .8, 1.28)), then for A<0 min(., -A*3):
    #   row 0: 1.5 -> -1.28 (clipped high), 0.5 -> -0.5 (A>0: low side not clipped), 1.1 masked
    #   row 1: 0.5 -> 0.8 (clipped low), 1.5 -> 1.5 (A<0: high side not clipped), 5.0 -> 5 capped at 3
    # token-mean over 5 valid tokens: (-1.28 - 0.5 + 0.8 + 1.5 + 3.0) / 5 = 0.704
    loss, metrics = policy_loss("ppo_clip", logprobs, old, adv, mask, {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0})
    assert loss.item() == pytest.approx(0.704, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 5)
    loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens, 0 on clipped ones; divided by 5 tokens
    close(logprobs.grad, [[0.0, -0.5 / 5, 0.0], [0.0, 1.5 / 5, 0.0]])
    # the global token count of a split step replaces the local one
    loss10, _ = policy_loss("ppo_clip", logprobs, old, adv, mask, {}, token_count=10)
    assert loss10.item() == pytest.approx(3.52 / 10, abs=1e-6)
    # no dual clip: the 5.0 token counts in full
    loss_nd, _ = policy_loss("ppo_clip", logprobs, old, adv, mask, {"dual_clip": None})
    assert loss_nd.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5 + 5.0) / 5, abs=1e-6)
    # IS weights multiply per token: (-1.28*2 - 0.5 + 0.8*0.5 + 1.5 + 3.0) / 5 = 0.368
    w = torch.tensor([[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    loss_is, _ = policy_loss("ppo_clip", logprobs, old, adv, mask, {}, w)
    assert loss_is.item() == pytest.approx(0.368, abs=1e-6)


def test_kl_and_entropy_terms():
    logprobs = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))  # log ratio ln 2 and 0
    mask = torch.tensor([[True, True]])
    ln2 = math.log(2)
    close(kl_penalty(logprobs, ref, mask, "k1"), [[ln2, 0.0]])
    close(kl_penalty(logprobs, ref, mask, "k2"), [[0.5 * ln2 ** 2, 0.0]])
    close(kl_penalty(logprobs, ref, mask, "k3"), [[0.5 + ln2 - 1, 0.0]])  # q/p - log(q/p) - 1
    close(kl_penalty(logprobs, ref, torch.tensor([[False, True]]), "k3"), [[0.0, 0.0]])
    # k3 is bounded at 10 (verl's clamp): a token whose reference probability is e^15 times its own
    assert float(kl_penalty(torch.tensor([[-20.0]]), torch.tensor([[-5.0]]), torch.tensor([[True]]), "k3")) == 10.0
    with pytest.raises(ConfigError, match="kl_kind"):
        kl_penalty(logprobs, ref, mask, "k4")
    # uniform over 2 -> ln 2;  probs (.25, .75) -> -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])
    close(entropy_from_logits(logits), [[ln2, 0.562335]])
    # loss = policy + kl_coef * mean k3 - entropy_coef * mean entropy; zero advantages leave only the terms
    lp = logprobs.clone().requires_grad_()
    loss, metrics = policy_loss("ppo_clip", lp, lp.detach(), torch.zeros(1), mask,
                                {"kl_coef": 0.1, "kl_kind": "k3", "entropy_coef": 0.01},
                                ref_logprobs=ref, entropy=entropy_from_logits(logits))
    expected = 0.1 * (0.5 + ln2 - 1) / 2 - 0.01 * (ln2 + 0.562335) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["loss/kl"] == pytest.approx((0.5 + ln2 - 1) / 2, abs=1e-6)


def test_truncated_is_weights():
    rollout = torch.zeros(2, 3)
    trainer = torch.log(torch.tensor([[3.0, 0.5, 1.5], [1.0, 1e-5, 1.0]])).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w, m = truncated_is_weights(trainer, rollout, mask, cap=2.0)
    assert not w.requires_grad
    close(w, [[2.0, 0.5, 1.5], [1.0, 1e-5, 0.0]])
    assert m["is/weight_mean"] == pytest.approx((2 + 0.5 + 1.5 + 1 + 1e-5) / 5, abs=1e-6)
    assert m["is/weight_max"] == pytest.approx(2.0)
    assert m["is/fraction_capped"] == pytest.approx(1 / 5)
    # GoLongRL's band [0.5, 5.0] with veto 1e-4: row 1 has a 1e-5 token -> its whole sequence gets 0
    w, m = truncated_is_weights(trainer, rollout, mask, cap=(0.6, 5.0), veto=1e-4)
    close(w, [[3.0, 0.6, 1.5], [0.0, 0.0, 0.0]])
    assert m["is/veto_fraction"] == pytest.approx(0.5)
    assert m["is/fraction_capped"] == pytest.approx(2 / 5)  # 0.5 -> 0.6 and 1e-5 -> 0.6
    # the lower bound as a mask: the 0.5 token leaves the gradient instead of being lifted to 0.6
    w, _ = truncated_is_weights(trainer, rollout, mask, cap=(0.6, 5.0), low_mode="mask")
    close(w, [[3.0, 0.0, 1.5], [1.0, 0.0, 0.0]])
    with pytest.raises(ConfigError, match="rl.is_cap"):
        truncated_is_weights(trainer, rollout, mask, cap=(2.0, 1.0))


def test_loss_bad_names():
    logprobs, old, adv, mask = _ppo_batch()
    with pytest.raises(ConfigError, match=r"rl.loss: unknown policy loss 'ppo-clip' \(did you mean 'ppo_clip'\?\)"):
        policy_loss("ppo-clip", logprobs, old, adv, mask)
    with pytest.raises(ConfigError, match=r"rl.loss.clip_hihg: .*did you mean 'clip_high'"):
        policy_loss("ppo_clip", logprobs, old, adv, mask, {"clip_hihg": 0.3})


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregation_recount_and_micro_batch_split(agg):
    """Each rl.loss_agg mode against a plain-Python recount, and split into micro-batches with the
    mini-batch's counts (LossScale) it sums to the whole batch's loss."""
    from keel.rl.losses import LossScale, aggregate

    torch.manual_seed(0)
    values = torch.randn(6, 9)
    lengths = [9, 1, 4, 7, 2, 5]
    mask = torch.tensor([[t < n for t in range(9)] for n in lengths])
    horizon = 12
    rows = [[float(values[i, t]) for t in range(n)] for i, n in enumerate(lengths)]
    recount = {
        "token_mean": sum(map(sum, rows)) / sum(lengths),
        "seq_mean_token_mean": sum(sum(r) / len(r) for r in rows) / len(rows),
        "seq_mean_token_sum_norm": sum(sum(r) / horizon for r in rows) / len(rows),
    }[agg]
    whole = LossScale(tokens=float(mask.sum()), sequences=6, horizon=horizon)
    assert float(aggregate(values, mask, agg, whole)) == pytest.approx(recount, rel=1e-5)
    split = sum(float(aggregate(values[i:i + 2], mask[i:i + 2], agg, whole)) for i in range(0, 6, 2))
    assert split == pytest.approx(recount, rel=1e-5)


def test_unknown_loss_agg_is_one_line():
    import keel
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match="rl.loss_agg"):
        keel.load_recipe(REPO / "recipes" / "rl" / "grpo-tiny.yaml", ["rl.loss_agg=seq_mean"])


def test_encoded_prompt_cache_is_bounded(monkeypatch):
    """A long run sees millions of prompts: only the most recent ENCODED_PROMPTS_KEPT stay encoded."""
    from types import SimpleNamespace

    from keel.rl import grpo

    monkeypatch.setattr(grpo, "ENCODED_PROMPTS_KEPT", 3)
    encoded = []
    trainer = grpo.GRPOTrainer.__new__(grpo.GRPOTrainer)
    trainer._encoded = grpo.OrderedDict()
    trainer.rl = SimpleNamespace(chat_template=False, max_prompt_tokens=100)
    trainer.tokenizer = SimpleNamespace(chat_template=None,
                                        encode=lambda text: encoded.append(text) or [len(text)])
    for text in ["a", "bb", "a", "ccc", "dddd", "a", "bb"]:
        assert trainer.encode_prompt(text) == [len(text)]
    assert list(trainer._encoded) == ["dddd", "a", "bb"]
    assert encoded == ["a", "bb", "ccc", "dddd", "bb"]  # "a" stayed recent enough to be reused
