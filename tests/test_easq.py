"""EASQ on the ranker: the simulated questionnaire, the DPO pair loss against a hand computation, the
pathway as a no-op at start whose DPO gradient reaches the adapters, satisfaction counted only where
answered, and a bounded run on the real MovieLens-100K whose satisfaction metrics recount."""
import math

import numpy as np
import pytest
import torch

import keel
from conftest import REPO, keel_refusal, read_metrics
from keel.data.recsys import build_rec_data
from keel.model.easq import EasqConfig, dpo_pair_losses, revealed
from keel.model.lora import lora_modules
from keel.model.ranker import Ranker, RankerConfig
from test_rec_ranker import bounded_run, prepared_task

EASQ = str(REPO / "recipes/recsys/easq-tiny.yaml")
STEPS = 20


def test_questionnaire_is_a_seeded_share_of_exposures():
    g = torch.Generator().manual_seed(0)
    users, items = torch.randint(1, 944, (200_000,), generator=g), torch.randint(1, 1683, (200_000,), generator=g)
    answered = revealed(users, items, 0.02)
    assert abs(answered.float().mean().item() - 0.02) < 4 * math.sqrt(0.02 * 0.98 / 200_000)
    # an exposure's answer does not depend on the batch it comes in, but does on the seed
    assert torch.equal(revealed(users[5:50], items[5:50], 0.02), answered[5:50])
    assert not torch.equal(revealed(users, items, 0.02, seed=1), answered)
    assert revealed(users[:7], items[:7], 1.0).all()


def test_dpo_pair_loss_against_hand_computation():
    policy = torch.tensor([0.3, -1.2, 2.0, 0.1, 0.7])
    reference = torch.tensor([0.1, -1.0, 1.5, 0.4, 0.7])
    satisfied = torch.tensor([True, False, True, False, True])
    answered = torch.tensor([True, True, True, True, False])
    got = dpo_pair_losses(policy, reference, satisfied, answered, beta=2.0)
    want = []
    for i in range(5):
        for j in range(5):
            if answered[i] and answered[j] and satisfied[i] and not satisfied[j]:
                margin = (policy[i] - reference[i]) - (policy[j] - reference[j])
                want.append(math.log(1 + math.exp(-2.0 * margin.item())))
    torch.testing.assert_close(got, torch.tensor(want))
    assert dpo_pair_losses(policy, reference, satisfied, torch.zeros(5, dtype=torch.bool), 1.0).numel() == 0


def tiny(easq=True) -> RankerConfig:
    return RankerConfig(dim=16, n_layers=2, n_heads=2, head_dim=8, negatives=2, context_len=6, n_items=30,
                        objectives=["engagement", "satisfaction"], easq=EasqConfig() if easq else None, dropout=0.0)


def test_pathway_starts_as_a_no_op_and_dpo_trains_it():
    torch.manual_seed(0)
    cfg = tiny()
    model = Ranker(cfg)
    model.init_weights()
    assert len(list(lora_modules(model))) == 7 and all(p.requires_grad for p in model.parameters())
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    rows = 6
    batch = {"ctx_items": torch.randint(1, 31, (rows, 6), generator=g), "ctx_ratings": torch.randint(1, 6, (rows, 6), generator=g),
             "candidates": torch.randint(1, 31, (rows, 3), generator=g), "labels": torch.zeros(rows, 3, 2),
             "label_weight": torch.zeros(rows, 3, 2),  # no BCE: the loss is the DPO term alone
             "satisfied": torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool),
             "answered": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)}
    loss = model(batch)
    assert loss.item() == pytest.approx(3 * 2 * math.log(2))  # B = 0: policy == reference on 6 pairs
    loss.backward()
    assert all(m.lora_b.grad.abs().sum() > 0 for _, m in lora_modules(model))
    # With B = 0 only B hears the pairs: f - f_ref does not depend on the shared weights (up to rounding).
    largest = max(m.lora_b.grad.abs().max() for _, m in lora_modules(model))
    shared = max(p.grad.abs().max() for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None)
    assert shared < 1e-5 * largest, (shared, largest)


def test_satisfaction_counts_only_on_answered_logged_items():
    cfg, task = prepared_task(EASQ)
    data = build_rec_data(task.rec, global_batch=512, micro_batch=512, dp_rank=0, dp_size=1, seed=0)
    batch = data.next_step()[0]
    inputs = task.with_inputs(batch)
    sat = cfg.model.objectives.index("satisfaction")
    answered = revealed(batch["user"], batch["targets"][:, 0], cfg.model.satisfaction_reveal) & (batch["targets"][:, 0] != 0)
    assert torch.equal(inputs["label_weight"][:, 0, sat], answered.float()) and inputs["label_weight"][:, 1:, sat].sum() == 0
    assert torch.equal(inputs["labels"][:, 0, sat].bool(), batch["target_ratings"][:, 0] >= cfg.model.satisfied_rating)
    assert 0 < answered.sum() < 0.06 * len(answered)
    n_other = (batch["targets"][:, 0] != 0).sum() * (1 + cfg.model.negatives)
    assert task.units(batch) == n_other + answered.sum() == inputs["label_weight"].sum()
    cfg.model.satisfaction_seed = 1  # the questionnaire's own seed key
    assert not torch.equal(task.answered(batch), answered)


@pytest.fixture(scope="module")
def easq_run(module_tmp):
    return bounded_run(EASQ, module_tmp / "easq", STEPS, STEPS, log_every=2)


def test_easq_run_metrics_recount(easq_run):
    rows = read_metrics(easq_run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    final = [r for r in rows if "eval_auc_satisfaction" in r][-1]
    cfg, task = prepared_task(easq_run / "config.yaml")
    model = keel.load(easq_run)
    data = build_rec_data(task.rec, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                          dp_rank=0, dp_size=1, seed=cfg.train.seed)
    counts = {"satisfaction": [0.0, 0], "main": [0.0, 0]}
    for batch in data.eval_batches(cfg.train.eval_batches, cfg.train.micro_batch, 0, 1):
        inputs = task.with_inputs(batch)
        with torch.no_grad():
            logits = model.scores(inputs["ctx_items"], inputs["ctx_ratings"], inputs["candidates"])[:, 0].numpy()
        real = (batch["targets"][:, 0] != 0).numpy()
        good = (batch["target_ratings"][:, 0] >= cfg.model.satisfied_rating).numpy()
        for name, column in (("satisfaction", 1), ("main", 0)):
            for a in logits[real & good, column]:
                for b in logits[real & ~good, column]:
                    counts[name][0] += (a > b) + 0.5 * (a == b)
                    counts[name][1] += 1
    assert final["eval_auc_satisfaction"] == pytest.approx(counts["satisfaction"][0] / counts["satisfaction"][1], abs=1e-6)
    assert final["eval_auc_main_satisfaction"] == pytest.approx(counts["main"][0] / counts["main"][1], abs=1e-6)


def test_bad_easq_options_are_one_line():
    assert "model.easq: needs the `satisfaction` objective" in keel_refusal(
        ["train", EASQ, "model.objectives=[engagement]"])
    assert "model.easq.lora.targets" in keel_refusal(["train", EASQ, "model.easq.lora.targets=nothing_here"])
    assert "model.satisfaction_reveal" in keel_refusal(["train", EASQ, "model.satisfaction_reveal=0"])
