"""The ranker's training task (keel/model/ranker.py): next-item samples of a `recsys:` log turned into
labelled candidates, and the metrics a reward model is judged by.

Each sample's logged next item is a positive candidate; model.negatives catalogue items drawn in
proportion to their training interactions (model.negative_sampling: popularity; or uniformly), never
the positive itself, are the negatives. The draw is seeded by the batch's content,
so a resumed run sees the same negatives and evaluation sees the same ones at every step. Only a
sample's first target is used (recsys.common_context > 1 shares one context over several).

Evaluation, on every validation user (recsys.mask_history applies to the full ranking):
- eval_hr@K / eval_ndcg@K: the held-out item ranked among all items by model.rank_by;
- eval_auc_engagement: per user, the share of its sampled negatives scored below its held-out item
  (ties half), averaged over users;
- eval_auc_like: over pairs of held-out items in the same eval batch, one rated >= model.like_rating
  and one not, the share where the like head scores the liked one higher (ties half): the AUC of
  telling liked from disliked items among those the users picked (0.5 = no better than chance);
  eval_like_rate is the share of held-out items liked.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from keel.errors import ConfigError
from keel.model.easq import revealed
from keel.model.rec_task import SASRecTask


def batch_seed(batch: dict) -> int:
    digest = hashlib.sha1(batch["ctx_items"].cpu().numpy().tobytes() + batch["targets"].cpu().numpy().tobytes())
    return int(digest.hexdigest()[:15], 16)


class RankerTask(SASRecTask):
    def prepare(self) -> None:
        super().prepare()
        counts = np.bincount(self.split.train_pairs()[1], minlength=self.log.n_items + 1).astype(np.float64)
        counts[0] = 0.0  # padding is never drawn
        if self.cfg.model.negative_sampling == "uniform":
            counts[1:] = 1.0
        self.negative_weights = torch.from_numpy(counts)
        if "like" in self.cfg.model.objectives and self.log.rating is None:
            raise ConfigError(f"model.objectives: `like` needs ratings, and {self.rec.dataset} has no rating "
                              f"column; drop it from model.objectives")

    def with_inputs(self, batch: dict) -> dict:
        """The batch with `candidates` [B, 1 + negatives] (the logged item first), their `labels`
        and `label_weight` [B, 1 + negatives, n_objectives] (padding rows count nothing; satisfaction
        counts only on the logged item of an answered exposure), and per row `satisfied` and
        `answered` (the simulated questionnaire, keel/model/easq.py)."""
        if "candidates" in batch:
            return batch
        cfg = self.cfg.model
        positive = batch["targets"][:, 0]
        rows, device = positive.shape[0], positive.device
        generator = torch.Generator().manual_seed(batch_seed(batch))
        negatives = torch.multinomial(self.negative_weights, rows * cfg.negatives, replacement=True,
                                      generator=generator).view(rows, cfg.negatives).to(device)
        # Redrawing a negative that hit the positive would change every later draw: step to the next item.
        negatives = torch.where(negatives == positive[:, None], negatives % cfg.n_items + 1, negatives)
        candidates = torch.cat([positive[:, None], negatives], 1)
        real = positive != 0
        satisfied = batch["target_ratings"][:, 0] >= cfg.satisfied_rating
        answered = self.answered(batch)
        labels = torch.zeros(rows, 1 + cfg.negatives, len(cfg.objectives), device=device)
        weight = real.float()[:, None, None].expand_as(labels).clone()
        for o, name in enumerate(cfg.objectives):
            if name == "engagement":
                labels[:, 0, o] = 1.0
            elif name == "like":
                labels[:, 0, o] = (batch["target_ratings"][:, 0] >= cfg.like_rating).float()
            else:  # satisfaction: an answer about the exposure itself; sampled items were never asked
                labels[:, 0, o] = satisfied.float()
                weight[:, :, o] = 0.0
                weight[:, 0, o] = answered.float()
        return {**batch, "candidates": candidates, "labels": labels, "label_weight": weight,
                "satisfied": satisfied, "answered": answered}

    def answered(self, batch: dict) -> torch.Tensor:
        """[B] bool: the logged exposures the simulated questionnaire has an answer for."""
        positive, cfg = batch["targets"][:, 0], self.cfg.model
        return (positive != 0) & revealed(batch["user"], positive, cfg.satisfaction_reveal, cfg.satisfaction_seed)

    def units(self, batch: dict) -> torch.Tensor:
        """label_weight's sum (with_inputs), counted without drawing the negatives: every candidate of
        a real row for each objective but satisfaction, which counts the answered rows."""
        cfg = self.cfg.model
        real = (batch["targets"][:, 0] != 0).sum()
        others = len([o for o in cfg.objectives if o != "satisfaction"])
        answered = self.answered(batch).sum() if "satisfaction" in cfg.objectives else 0
        return (real * (1 + cfg.negatives) * others + answered).float()

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        batch = super().fake_batch(rows, cp)
        batch["target_ratings"] = torch.full_like(batch["targets"], self.cfg.model.like_rating)
        return batch

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        sums = super().eval_sums(model, batch)
        cfg, inputs = self.cfg.model, self.with_inputs(batch)
        real = inputs["labels"].new_tensor(inputs["targets"][:, 0] != 0)
        with torch.no_grad():
            logits = model.scores(inputs["ctx_items"], inputs["ctx_ratings"], inputs["candidates"])
        ratings = inputs["target_ratings"][:, 0]
        for o, name in enumerate(cfg.objectives):
            own = logits[..., o]
            if name == "engagement":
                pos, neg = own[:, :1], own[:, 1:]
                auc = ((pos > neg).float() + 0.5 * (pos == neg).float()).mean(1)
                sums["auc_engagement"] = (auc * real).sum().cpu()
            else:  # judged on the logged items, every rating known: liked / satisfied above the others?
                good = ratings >= (cfg.like_rating if name == "like" else cfg.satisfied_rating)
                sums.update(pair_sums(name, own[:, 0], good & real.bool(), ~good & real.bool()))
                sums[f"{name}_rate"] = (good & real.bool()).float().sum().cpu()
        if "satisfaction" in cfg.objectives:  # does the main ranking output order satisfied items first?
            main = logits[:, 0, cfg.objectives.index(cfg.rank_by)]
            good = ratings >= cfg.satisfied_rating
            sums.update(pair_sums("main_satisfaction", main, good & real.bool(), ~good & real.bool()))
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        out = super().eval_metrics(sums)
        users = max(sums["users"], 1)
        out.update({f"eval_{k}": sums[k] / users for k in ("auc_engagement", "like_rate", "satisfaction_rate")
                    if k in sums})
        for name in ("like", "satisfaction", "main_satisfaction"):
            if sums.get(f"{name}_pairs"):
                out[f"eval_auc_{name}"] = sums[f"{name}_pairs_won"] / sums[f"{name}_pairs"]
        return out


def pair_sums(name: str, scores: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over pairs (a good row, a bad row) of one batch: how many the scores order right (ties half)."""
    pos, neg = scores[good][:, None], scores[bad][None, :]
    return {f"{name}_pairs_won": ((pos > neg).float() + 0.5 * (pos == neg).float()).sum().cpu(),
            f"{name}_pairs": torch.tensor(float(pos.numel() * neg.numel()))}
