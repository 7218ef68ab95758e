"""A multi-task ranking model (`model.name: ranker`): the reward model of recommender RL. Single-device.

It answers "how would this user respond to this item?" with one probability per objective, the
way a P-Score-style ranker does: a user tower (SASRec's causal encoder over the user's recent
items and the ratings it gave them, keel/model/sasrec.py) and the candidate item's embedding (the
same table) feed one small tower per objective, each ending in a logit (plus a per-item offset)
trained with binary cross-entropy.

Objectives on an interaction log (labels are built by keel/model/ranker_task.py):
- engagement: 1 for the item the user interacted with next, 0 for items sampled from the catalogue
  (model.negative_sampling: by popularity, as real exposures skew, or uniformly);
- like: 1 for a next item the user rated >= model.like_rating, 0 otherwise (sampled items included),
  i.e. P(engage and like), so that "liked" never rewards an item the user would not pick.

Entry points: model(batch) -> BCE summed over candidates and objectives (batch["candidates"] [B, N],
batch["labels"] [B, N, n_objectives]); model.scores(ctx_items, ctx_ratings, candidates) -> logits
[B, N, n_obj]; model(batch, score_items=True) -> the `rank_by` objective's logits for every item [B, n_items + 1].
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.data.recsys import MAX_RATING
from keel.errors import ConfigError
from keel.model.easq import EasqConfig, dpo_pair_losses
from keel.model.lora import adapters_disabled, apply_lora, lora_modules
from keel.model.sasrec import SASRec, SASRecConfig

OBJECTIVES = ("engagement", "like", "satisfaction")
NEGATIVE_SAMPLING = ("popularity", "uniform")


@dataclass
class RankerConfig:
    name: str = "ranker"  # the family
    dim: int = 64  # user state and item embedding width
    n_layers: int = 2  # blocks of the user tower
    n_heads: int = 2  # attention heads of the user tower
    ffn_dim: int = 0  # SwiGLU hidden width of the user tower; 0: 8/3 * dim rounded up to 64
    dropout: float = 0.1  # on the user tower's embeddings and residual branches
    head_dim: int = 64  # hidden width of each objective's tower
    objectives: list[str] = field(default_factory=lambda: [*OBJECTIVES])  # which heads, in order
    like_rating: int = 4  # `like` = a rating >= this (MovieLens: 4 and 5 of 1..5)
    negatives: int = 4  # catalogue items sampled per logged item (engagement 0) in training and eval
    # How negatives are drawn: `popularity` in proportion to the items' training interactions (what a
    # log of real exposures looks like: shown items skew popular), or `uniform` over the catalogue.
    negative_sampling: str = "uniform"
    rank_by: str = "engagement"  # the objective `keel recommend` and HR/NDCG rank every item by
    satisfied_rating: int = 4  # `satisfaction` (a questionnaire answer's stand-in) = the logged item rated >= this
    satisfaction_reveal: float = 0.02  # share of training exposures whose satisfaction is known (a seeded hash of user and item)
    satisfaction_seed: int = 0  # seed of that hash: which exposures the simulated questionnaire reaches
    easq: Optional[EasqConfig] = None  # EASQ: a LoRA pathway + online DPO on satisfaction pairs (keel/model/easq.py); null: off
    norm_eps: float = 1e-5
    init_std: float = 0.02
    context_len: int = 50  # filled from recsys.context_len
    n_items: int = 0  # filled from the data

    def validate(self) -> None:
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"model.objectives: expected distinct names among {list(OBJECTIVES)}, got {self.objectives}")
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise ConfigError(f"model.objectives: unknown objective {name!r}; expected some of {list(OBJECTIVES)}")
        if self.rank_by not in self.objectives:
            raise ConfigError(f"model.rank_by: {self.rank_by!r} is not one of model.objectives {self.objectives}")
        if self.negatives < 1:
            raise ConfigError(f"model.negatives: expected >= 1 sampled items per logged one, got {self.negatives}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ConfigError(f"model.negative_sampling: expected one of {list(NEGATIVE_SAMPLING)}, "
                              f"got {self.negative_sampling!r}")
        if self.head_dim < 1:
            raise ConfigError(f"model.head_dim: must be > 0, got {self.head_dim}")
        if not 0 < self.satisfaction_reveal <= 1:
            raise ConfigError(f"model.satisfaction_reveal: expected a share in (0, 1], got {self.satisfaction_reveal}")
        if self.easq is not None:
            self.easq.validate()
            if "satisfaction" not in self.objectives:
                raise ConfigError("model.easq: needs the `satisfaction` objective in model.objectives (its own head)")
        self.tower_config().validate()

    def tower_config(self) -> SASRecConfig:
        return SASRecConfig(name=self.name, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                            ffn_dim=self.ffn_dim, dropout=self.dropout, norm_eps=self.norm_eps,
                            init_std=self.init_std, context_len=self.context_len, n_items=self.n_items)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        heads = len(self.objectives) * (3 * self.dim * self.head_dim + 2 * self.head_dim + 1)
        bias = (self.n_items + 1) * len(self.objectives) + (MAX_RATING + 1) * self.dim  # item offsets, ratings
        return self.tower_config().num_params(embeddings) + heads + (bias if embeddings else 0) + self.lora_params()

    def lora_params(self) -> int:
        """Adapter parameters of model.easq.lora: rank * (in + out) per user-tower linear it matches."""
        if self.easq is None:
            return 0
        d, f = self.dim, self.tower_config().ffn_dim
        shapes = {"attention.wq": (d, d), "attention.wk": (d, d), "attention.wv": (d, d), "attention.wo": (d, d),
                  "feed_forward.w1": (d, f), "feed_forward.w3": (d, f), "feed_forward.w2": (f, d)}
        pattern = re.compile(self.easq.lora.targets)
        return sum(self.easq.lora.rank * (n_in + n_out) for layer in range(self.n_layers)
                   for name, (n_in, n_out) in shapes.items() if pattern.search(f"user_tower.layers.{layer}.{name}"))


class Ranker(nn.Module):
    def __init__(self, cfg: RankerConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.user_tower = SASRec(cfg.tower_config())  # its item table embeds the candidates too
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(3 * cfg.dim, cfg.head_dim), nn.SiLU(),
                                                        nn.Linear(cfg.head_dim, 1))
                                    for name in cfg.objectives})
        # A logit offset per item and objective: how popular (or well liked) an item is regardless of
        # the user, which the towers would otherwise have to squeeze into the item's embedding.
        self.item_bias = nn.Embedding(cfg.n_items + 1, len(cfg.objectives))
        # What the user thought of each context item (0 = padding): how a user rates says more about
        # what it will like than which items it picked.
        self.ratings = nn.Embedding(MAX_RATING + 1, cfg.dim)
        if cfg.easq is not None:  # the satisfaction pathway; every weight keeps training (behaviour BCE)
            apply_lora(self, cfg.easq.lora, key="model.easq.lora")
            for param in self.parameters():
                param.requires_grad_(True)

    @property
    def layers(self) -> nn.ModuleDict:
        """The user tower's blocks: the units keel/train shards and checkpoints, as in every family."""
        return self.user_tower.layers

    @torch.no_grad()
    def init_buffers(self) -> None:
        self.user_tower.init_buffers()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.user_tower.init_weights()
        nn.init.zeros_(self.item_bias.weight)
        for _, module in lora_modules(self):
            module.reset_lora_parameters()  # B = 0: the pathway starts as a no-op
        nn.init.normal_(self.ratings.weight, std=self.config.init_std)
        for head in self.heads.values():
            for lin in (head[0], head[2]):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features))
                nn.init.zeros_(lin.bias)

    def scores(self, ctx_items: torch.Tensor, ctx_ratings: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, n_objectives] of candidates [B, N] for left-padded contexts [B, C] of items
        and their ratings (1..5; 0 = padding)."""
        user = self.user_tower.user_state(ctx_items, self.ratings(ctx_ratings))[:, None, :]
        item = self.user_tower.tok_embeddings(candidates)
        x = torch.cat([user.expand_as(item), item, user * item], -1)
        return (torch.cat([head(x) for head in self.heads.values()], -1) + self.item_bias(candidates)).float()

    def forward(self, batch, score_items: bool = False):
        if score_items:
            rows = batch["ctx_items"].shape[0]
            every = torch.arange(self.config.n_items + 1, device=batch["ctx_items"].device).expand(rows, -1)
            logits = self.scores(batch["ctx_items"], batch["ctx_ratings"], every)
            logits = logits[..., self.config.objectives.index(self.config.rank_by)]
            logits[:, 0] = float("-inf")  # padding is never an item
            return logits
        logits = self.scores(batch["ctx_items"], batch["ctx_ratings"], batch["candidates"])
        bce = F.binary_cross_entropy_with_logits(logits, batch["labels"].float(), reduction="none")
        loss = (bce * batch["label_weight"]).sum()
        easq = self.config.easq
        if easq is not None and easq.weight:
            main = self.config.objectives.index(self.config.rank_by)
            # The reference is the ranker without the pathway, differentiated too: the pairs then train
            # f - f_ref, the pathway's own effect, and leave the shared weights to the behaviour labels.
            with adapters_disabled(self):
                reference = self.scores(batch["ctx_items"], batch["ctx_ratings"], batch["candidates"][:, :1])[:, 0, main]
            pairs = dpo_pair_losses(logits[:, 0, main], reference, batch["satisfied"], batch["answered"], easq.beta)
            loss = loss + easq.weight * pairs.sum()
        return loss


def build_ranker(cfg: RankerConfig) -> Ranker:
    return Ranker(cfg)
