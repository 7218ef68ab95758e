"""OneRec's RL objectives against hand-computed values: ECPO (V1), GBPO (V2) and duration-aware
reward shaping (V2 §3.3), including GBPO's bounded gradient for a negative sample as pi -> 0."""
import math

import pytest
import torch

from keel.errors import ConfigError
from keel.rl.advantages import compute_advantages
from keel.rl.losses import policy_loss
from keel.rl.rec_objectives import duration_bucket, duration_quantile_rewards

ONE = torch.ones(1, 1, dtype=torch.bool)


def single(name, p, p_old, advantage, **options):
    """(loss, d loss / d log pi) for one one-code item."""
    logp = torch.tensor([[math.log(p)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(p_old)]], dtype=torch.float64)
    loss, _ = policy_loss(name, logp, old, torch.tensor([advantage], dtype=torch.float64), ONE, options)
    loss.backward()
    return float(loss), float(logp.grad)


@pytest.mark.parametrize("p, p_old, adv, want_loss, want_grad", [
    # pi'_old = max(0.5 / 1.3, 0.1) -> ratio 1.3, clipped to 1.2 for A > 0: no gradient
    (0.5, 0.1, 1.0, -1.2, 0.0),
    # A < 0: min(-1.3, -1.2) = -1.3 is kept: loss 1.3, gradient = ratio = 1.3 (PPO alone: ratio 5)
    (0.5, 0.1, -1.0, 1.3, 1.3),
    # pi_old above pi: the lift does nothing; ratio 0.5 unclipped for A > 0
    (0.2, 0.4, 1.0, -0.5, -0.5),
])
def test_ecpo_hand_computed(p, p_old, adv, want_loss, want_grad):
    loss, grad = single("ecpo", p, p_old, adv, epsilon=0.2, delta=0.1)
    assert loss == pytest.approx(want_loss, abs=1e-12) and grad == pytest.approx(want_grad, abs=1e-12)
    ppo_loss, _ = single("ppo_clip", p, p_old, adv, clip_low=0.2, clip_high=0.2, dual_clip=None)
    if adv < 0 and p / p_old > 1.3:
        assert ppo_loss == pytest.approx(-adv * p / p_old)  # what the early clip prevents: 5.0


def gbpo_grad_wrt_pi(pi: float, advantage: float, pi_old=None) -> float:
    """d loss / d pi (pi itself the leaf) of GBPO for a one-code item; pi_old unknown -> sg(pi)."""
    p = torch.tensor([[pi]], dtype=torch.float64, requires_grad=True)
    logp = torch.log(p)
    old = logp.detach() if pi_old is None else torch.tensor([[math.log(pi_old)]], dtype=torch.float64)
    loss, _ = policy_loss("gbpo", logp, old, torch.tensor([advantage], dtype=torch.float64), ONE)
    loss.backward()
    return float(p.grad)


def test_gbpo_negative_gradient_stays_bounded_as_pi_vanishes():
    for pi in (1e-2, 1e-4, 1e-8):
        # -pi / max(pi_old, 1 - pi) * A with A = -1: d/dpi = 1 / (1 - pi), the BCE negative gradient
        assert gbpo_grad_wrt_pi(pi, -1.0) == pytest.approx(1 / (1 - pi), rel=1e-9)
        # the ratio-1 policy gradient -A * log pi: d/dpi = 1 / pi, which explodes
        p = torch.tensor(pi, dtype=torch.float64, requires_grad=True)
        (1.0 * torch.log(p)).backward()
        assert float(p.grad) == pytest.approx(1 / pi)
    # positives: pi'_old = max(pi_old, pi) = pi when pi_old is unknown -> ratio 1, gradient -A / pi
    assert gbpo_grad_wrt_pi(0.25, 2.0) == pytest.approx(-2.0 / 0.25)
    # a logged generation probability above pi bounds it too: -A / pi_old
    assert gbpo_grad_wrt_pi(0.25, 2.0, pi_old=0.5) == pytest.approx(-2.0 / 0.5)


def test_item_ratio_is_the_product_over_codes_spread_over_them():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.5, 1.0]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    loss, _ = policy_loss("gbpo", logp, logp.detach(), adv, mask, {"ratio": "item"}, agg="seq_mean_token_mean")
    item_pi = torch.tensor([0.125, 0.1], dtype=torch.float64)
    want = ((item_pi[0] / (1 - item_pi[0])) * 1.0 + (-1.0)) / 2  # negative: pi / (1 - pi); positive: ratio 1
    assert float(loss) == pytest.approx(float(want))
    per_token, _ = policy_loss("gbpo", logp, logp.detach(), adv, mask, {"ratio": "token"}, agg="seq_mean_token_mean")
    token_pi = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    want_token = ((token_pi / (1 - token_pi)).mean() + (-1.0)) / 2
    assert float(per_token) == pytest.approx(float(want_token))


def test_duration_buckets_and_same_bucket_quantiles():
    assert duration_bucket(torch.tensor([1.0, 3.0, 8.0, 0.5]), beta=2.0).tolist() == [0, 1, 3, -1]
    # sample 0: history durations 10, 12 share bucket 3 with the target (11); 100 does not.
    #   playtimes there {5, 9}; target playtime 7 -> q = 1/2
    # sample 1: no history in its bucket -> 0; sample 2: an explicit dislike -> -1
    indptr = torch.tensor([0, 3, 4, 5])
    hist_d = torch.tensor([10.0, 12.0, 100.0, 1000.0, 11.0])
    hist_p = torch.tensor([5.0, 9.0, 50.0, 3.0, 1.0])
    q = duration_quantile_rewards(indptr, hist_d, hist_p, torch.tensor([11.0, 11.0, 11.0]),
                                  torch.tensor([7.0, 7.0, 7.0]), torch.tensor([False, False, True]), beta=2.0)
    assert q.tolist() == [0.5, 0.0, -1.0]
    # an independent recount on random histories
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 12, (40,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    hist_d = torch.rand(int(indptr[-1]), generator=g) * 600
    hist_p = torch.rand(int(indptr[-1]), generator=g) * 600
    dur, play = torch.rand(40, generator=g) * 600, torch.rand(40, generator=g) * 600
    got = duration_quantile_rewards(indptr, hist_d, hist_p, dur, play, torch.zeros(40, dtype=torch.bool), beta=3.0)
    for i in range(40):
        bucket = math.floor(math.log(float(dur[i]) + 1e-6, 3.0))
        same = [float(p) for d, p in zip(hist_d[indptr[i]:indptr[i + 1]], hist_p[indptr[i]:indptr[i + 1]])
                if math.floor(math.log(float(d) + 1e-6, 3.0)) == bucket]
        want = sum(p <= float(play[i]) for p in same) / len(same) if same else 0.0
        assert float(got[i]) == pytest.approx(want, abs=1e-6), i


def test_duration_aware_advantages_top_quartile_and_negatives():
    rewards = torch.tensor([0.5, 0.9, 0.1, -1.0, 0.95, 0.3])
    state: dict = {}
    adv = compute_advantages("duration_aware", rewards, torch.zeros(6), ["rec"] * 6, None, state)
    # the 0.75 quantile of [0.1, 0.3, 0.5, 0.9, 0.95] is 0.9: only 0.95 is above it
    assert adv.tolist() == [0.0, 0.0, 0.0, -1.0, 1.0, 0.0]
    assert state["metrics"]["advantage/threshold"] == pytest.approx(0.9)


@pytest.mark.parametrize("call, key", [
    (lambda: policy_loss("gbpx", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), ONE), "rl.loss"),
    (lambda: policy_loss("gbpo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), ONE, {"ratio": "seq"}),
     "rl.loss.ratio"),
    (lambda: duration_bucket(torch.ones(1), beta=1.0), "rl.reward.beta"),
    (lambda: compute_advantages("duration_aware", torch.ones(2), torch.zeros(2), ["a", "a"], {"quantile": 1.5}),
     "rl.advantage.quantile"),
])
def test_bad_options_are_one_line_config_errors(call, key):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
