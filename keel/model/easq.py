"""EASQ on the multi-task ranker: aligning the main ranking output with sparse satisfaction answers.

A questionnaire reaches few exposures and few users answer it, so satisfaction labels are far sparser
than behaviour labels and drown when both train together. What keel builds (the method is described
in words; the pair construction and the loss's details are keel's choice, each a key):

- a separate `satisfaction` objective on the ranker (its own tower; BCE only where an answer exists),
  so the sparse labels do not share a head with the dense behaviour ones;
- a LoRA pathway on the user tower's lower block (`model.easq.lora`, keel/model/lora.py): the main
  model is the ranker *with* the pathway; the reference is the same ranker with the pathway switched
  off (no second copy of the weights);
- an online DPO objective on the main ranking logit f (model.rank_by's head) over the micro-batch's
  answered exposures: every (satisfied, unsatisfied) pair gives
      -log sigmoid(beta * [(f(x+) - f_ref(x+)) - (f(x-) - f_ref(x-))]),
  f - f_ref is exactly the pathway's effect on the logit, and the reference is differentiated too
  (not a frozen copy as in offline DPO), so the pairs train what the pathway adds and reach the shared
  weights only through it (none at all while the pathway is still zero); the behaviour BCE keeps
  training the whole ranker. This is keel's reading of "parameter-isolated".

MovieLens has no questionnaire: the rating of the logged item stands in for the answer (satisfied =
rating >= model.satisfied_rating) and is revealed for a seeded share `model.satisfaction_reveal` of
training exposures (~2% by default); evaluation knows every held-out rating.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from keel.errors import ConfigError
from keel.model.lora import LoRAConfig


def _lower_block_lora() -> LoRAConfig:
    return LoRAConfig(rank=4, alpha=8.0, targets=r"user_tower\.layers\.0\.(attention\.w[qkvo]|feed_forward\.w[123])$")


@dataclass
class EasqConfig:
    lora: LoRAConfig = field(default_factory=_lower_block_lora)  # the satisfaction pathway: every linear of the user tower's first block
    beta: float = 1.0  # DPO temperature on the main logit
    weight: float = 1.0  # DPO term weight, per pair, beside the BCE terms (summed per label)

    def validate(self, key: str = "model.easq") -> None:
        self.lora.validate(f"{key}.lora")
        if self.beta <= 0:
            raise ConfigError(f"{key}.beta: must be > 0, got {self.beta}")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight: must be >= 0, got {self.weight}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (uint64 arithmetic wraps, as intended)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def revealed(users: torch.Tensor, items: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """Which (user, item) exposures have a questionnaire answer: a hash of the pair below `share`,
    so the same exposure is answered (or not) in every epoch, run and layout."""
    if share >= 1.0:
        return torch.ones_like(users, dtype=torch.bool)
    keys = (users.cpu().numpy().astype(np.uint64) << np.uint64(32)) | items.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        uniform = (_splitmix64(_splitmix64(keys) ^ np.uint64(seed)) >> np.uint64(11)) / float(2 ** 53)
    return torch.from_numpy(uniform < share).to(users.device)


def dpo_pair_losses(policy: torch.Tensor, reference: torch.Tensor, satisfied: torch.Tensor, answered: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """-log sigmoid(beta [(f - f_ref)(x+) - (f - f_ref)(x-)]) for every (satisfied, unsatisfied) pair
    of answered rows: a flat tensor of the pair losses (empty when a side has no row)."""
    margin = (policy - reference).float()
    pos, neg = margin[answered & satisfied], margin[answered & ~satisfied]
    return -F.logsigmoid(beta * (pos[:, None] - neg[None, :])).flatten()
