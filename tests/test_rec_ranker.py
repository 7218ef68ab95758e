"""The multi-task ranker (`model.name: ranker`) and recommender RL against it (the `reward_model`
reward), on the real MovieLens-100K: labels, metrics and rewards recounted from the log, a bounded
training run whose loss falls, bad options. How good the ranker gets (against popularity and
item-average baselines) and whether RL raises its reward are measured by bench/recsys_reward_model.py,
at the recipe's length: that is minutes, not a test's seconds."""
import numpy as np
import pytest
import torch

import keel
from conftest import REPO, keel_refusal, read_metrics, run_keel
from keel.data.recsys import build_rec_data, train_samples
from keel.model.registry import get_model_spec
from keel.rl.rec_rewards import UserView, combined_rewards, rec_reward_options

RANKER = str(REPO / "recipes/recsys/ranker-tiny.yaml")
RL_RM = str(REPO / "recipes/recsys/onerec-v2-rl-rm-tiny.yaml")
STEPS = 20


def prepared_task(recipe, overrides=()):
    cfg = keel.load_recipe(recipe, list(overrides))
    task = get_model_spec(cfg.model.name).task(cfg)
    task.prepare()
    return cfg, task


def bounded_run(recipe, out, steps: int, eval_every: int, log_every: int = 1):
    """`keel train` of a shipped recipe for a few steps, with evals, no checkpoints, offline."""
    run_keel(["train", recipe, f"run.out_dir={out}", f"train.steps={steps}", f"train.eval_every={eval_every}",
              f"train.log_every={log_every}", "checkpoint.every=0", "logging.wandb=disabled",
              "logging.progress=false"], timeout=900)
    return out


@pytest.fixture(scope="module")
def ranker(module_tmp):
    """A bounded run of the shipped ranker recipe (evals at half way and at the end)."""
    return bounded_run(RANKER, module_tmp / "ranker", STEPS, STEPS // 2)


def test_candidates_and_labels_follow_the_log():
    cfg, task = prepared_task(RANKER)
    samples = train_samples(task.split, task.rec)
    rows = np.random.default_rng(0).choice(len(samples), 64, replace=False)
    batch = torch.utils.data.default_collate([samples[int(i)] for i in rows])
    inputs = task.with_inputs(batch)
    positions = samples.positions[rows]
    assert torch.equal(inputs["candidates"][:, 0], torch.from_numpy(task.split.items[positions]))
    assert (inputs["candidates"][:, 1:] != inputs["candidates"][:, :1]).all()
    assert inputs["candidates"].shape == (64, 1 + cfg.model.negatives) and inputs["candidates"].min() >= 1
    liked = torch.from_numpy(task.split.ratings[positions] >= cfg.model.like_rating).float()
    engagement, like = (cfg.model.objectives.index(n) for n in ("engagement", "like"))
    assert torch.equal(inputs["labels"][:, 0, like], liked) and (inputs["labels"][:, 0, engagement] == 1).all()
    assert (inputs["labels"][:, 1:] == 0).all()
    # The negatives are a function of the batch: a resumed run and every eval see the same ones.
    assert torch.equal(task.with_inputs(batch)["candidates"], inputs["candidates"])


def recount(model, task, cfg):
    """eval_auc_engagement and eval_auc_like by their definitions, one user and one pair at a time,
    over the batches the trainer evaluates."""
    data = build_rec_data(task.rec, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                          dp_rank=0, dp_size=1, seed=cfg.train.seed)
    popularity = np.bincount(task.split.train_pairs()[1], minlength=task.log.n_items + 1)
    auc, pop_auc, won, pairs, users = 0.0, 0.0, 0.0, 0, 0
    for batch in data.eval_batches(cfg.train.eval_batches, cfg.train.micro_batch, 0, 1):
        inputs = task.with_inputs(batch)
        with torch.no_grad():
            logits = model.scores(inputs["ctx_items"], inputs["ctx_ratings"], inputs["candidates"]).numpy()
        liked, other = [], []
        for row in range(len(logits)):
            if batch["targets"][row, 0] == 0:
                continue
            users += 1
            s = logits[row, :, cfg.model.objectives.index("engagement")]
            auc += np.mean([(s[0] > n) + 0.5 * (s[0] == n) for n in s[1:]])
            pop = popularity[inputs["candidates"][row].numpy()]
            pop_auc += np.mean([(pop[0] > n) + 0.5 * (pop[0] == n) for n in pop[1:]])
            like = logits[row, 0, cfg.model.objectives.index("like")]
            (liked if inputs["labels"][row, 0, cfg.model.objectives.index("like")] else other).append(like)
        for a in liked:
            for b in other:
                won, pairs = won + (a > b) + 0.5 * (a == b), pairs + 1
    return auc / users, pop_auc / users, won / pairs


def test_ranker_loss_falls_and_its_metrics_recount(ranker):
    rows = read_metrics(ranker)
    losses = [r["loss"] for r in rows if "loss" in r]
    final = [r for r in rows if "eval_auc_engagement" in r][-1]
    cfg, task = prepared_task(ranker / "config.yaml")
    auc, popularity_auc, like_auc = recount(keel.load(ranker), task, cfg)
    print(f"\nranker after {STEPS} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}; engagement AUC {auc:.4f} "
          f"(popularity {popularity_auc:.4f}), like AUC {like_auc:.4f}")
    assert final["eval_auc_engagement"] == pytest.approx(auc, abs=1e-6)
    assert final["eval_auc_like"] == pytest.approx(like_auc, abs=1e-6)
    assert losses[-1] < 0.8 * losses[0]


def test_reward_model_reward_is_the_weighted_head_probabilities(ranker):
    cfg, task = prepared_task(ranker / "config.yaml")
    model = keel.load(ranker)
    samples = train_samples(task.split, task.rec)
    rows = np.random.default_rng(1).choice(len(samples), 8, replace=False)
    positions = samples.positions[rows]
    users = samples.user_of[positions]
    items = torch.randint(1, task.log.n_items + 1, (8, 5), generator=torch.Generator().manual_seed(0))
    items[0, 2] = 0  # a code path that is no item
    weights = {"like": 1.0, "engagement": 0.25}
    options = rec_reward_options("reward_model", {"path": str(ranker), "objectives": weights})
    got = combined_rewards({"reward_model": 1.0}, {"reward_model": options}, UserView(task.split, positions, users),
                           items, None, None)
    context = torch.utils.data.default_collate([samples[int(i)] for i in rows])
    with torch.no_grad():
        probs = torch.sigmoid(model.scores(context["ctx_items"], context["ctx_ratings"], items.clamp(min=1)))
    want = sum(w * probs[..., cfg.model.objectives.index(n)] for n, w in weights.items())
    assert torch.isnan(got[0, 2]) and torch.isnan(got).sum() == 1
    torch.testing.assert_close(got.nan_to_num(0.0), want.masked_fill(items == 0, 0.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("rl.rec.reward_cfg.reward_model.path=null", "rl.rec.reward_cfg.reward_model.path: required"),
    ("rl.rec.reward_cfg.reward_model.path=POLICY", "holds a 'onerec' model; expected a ranker"),
    ("rl.rec.reward_cfg.reward_model.objectives={clicks: 1.0}", "'clicks' is not a head of this ranker"),
])
def test_bad_reward_model_options_are_one_line(trained, ranker, tmp_path, override, message):
    args = ["rl", RL_RM, f"rl.policy={trained}", f"rl.rec.reward_cfg.reward_model.path={ranker}",
            f"run.out_dir={tmp_path}", "logging.wandb=disabled", "logging.progress=false"]
    assert message in keel_refusal([*args, override.replace("POLICY", str(trained))])
