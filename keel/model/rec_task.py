"""The recommendation families' training task: a `recsys:` log, semantic IDs, ranking metrics.

`RecommendationTask` reads the log named by `recsys.dataset`, splits it per user leave-one-out
(keel/data/recsys.py), fills the model config's data-derived sizes (items, users, feature
vocabularies, SID levels) before the model is built, and evaluates by full ranking: HR@K and NDCG@K
of the held-out item among every item, the user's known items masked (recsys.mask_history).
A family says how it scores every item for a batch (`item_scores`); nothing here branches on a
family's name. Generative families (OneRec-V2) read their targets as semantic IDs from the table
`keel sid build` wrote (`sid_table_path`): scores are exact sequence log-probabilities over every
valid SID (recsys.eval_beam 0) or those of a constrained beam search.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch

from keel.data.assets import keel_home
from keel.data.rec_config import RecsysConfig, SidConfig
from keel.data.recsys import build_rec_data, load_split, resolve_dataset
from keel.errors import ConfigError
from keel.model.item_embeddings import ItemSource, item_embeddings
from keel.model.rec_eval import mask_history, ranking_metrics, target_ranks
from keel.model.rq_vae import rq_vae
from keel.model.semantic_ids import SidTable, rq_kmeans
from keel.model.sid_beam import SidTrie, beam_search, score_all_items
from keel.model.task import TrainingTask


def sid_table_path(cfg: RecsysConfig) -> Path:
    """recsys.sid_table, or by default a file beside the data named by a digest of recsys.sid (so a
    changed tokenizer setting never reads a stale table). A dataset read from inside an installed
    package (RecBole's ML-100K when not fetched) keeps its tables under $KEEL_HOME/sid instead."""
    if cfg.sid_table:
        return Path(cfg.sid_table).expanduser()
    digest = hashlib.sha256(json.dumps(sid_settings(cfg.sid), sort_keys=True).encode()).hexdigest()[:10]
    prefix = resolve_dataset(cfg.dataset)
    folder = keel_home() / "sid" if "site-packages" in prefix.parts else prefix.parent
    return folder / f"{prefix.name}.sid-{digest}.npz"


def sid_settings(sid: SidConfig) -> dict:
    """The settings a table is built from; RQ-KMeans reads no RQ-VAE key, so those stay out of its
    digest (a table built before the RQ-VAE methods existed keeps its name)."""
    settings = asdict(sid)
    if sid.method == "rq_kmeans":
        settings.pop("method"), settings.pop("vae")
    return settings


def _rq_kmeans(embeddings, sid: SidConfig, histories, item_ids) -> SidTable:
    return rq_kmeans(embeddings, sid.levels, sid.codebook, iters=sid.kmeans_iters, seed=sid.seed,
                     balanced_last=sid.balanced_last, dedup=sid.dedup, item_ids=item_ids)


def _rq_vae(coba: bool):
    def build(embeddings, sid: SidConfig, histories, item_ids) -> SidTable:
        return rq_vae(embeddings, sid.levels, sid.codebook, sid.vae, coba=coba, histories=histories,
                      iters=sid.kmeans_iters, seed=sid.seed, dedup=sid.dedup, item_ids=item_ids)
    return build


# recsys.sid.method -> builder(item embeddings, SidConfig, train histories (indptr, items), item ids)
SID_BUILDERS = {"rq_kmeans": _rq_kmeans, "rq_vae": _rq_vae(coba=False), "coba": _rq_vae(coba=True)}


def build_sid_table(cfg: RecsysConfig) -> tuple[SidTable, Path]:
    """Semantic IDs of the log's items by recsys.sid.method from the embeddings recsys.sid.embedding
    names (collaborative ones, and CoBa's co-occurrences, from training interactions only: no
    held-out item informs a SID)."""
    log, split = load_split(cfg)
    users, items = split.train_pairs()
    source = ItemSource(n_users=log.n_users, n_items=log.n_items, user_idx=users, item_idx=items,
                        texts=log.item_text, svd_dim=cfg.sid.svd_dim, seed=cfg.sid.seed)
    embeddings = item_embeddings(cfg.sid.embedding, source)
    table = SID_BUILDERS[cfg.sid.method](embeddings, cfg.sid, split.history("valid"), log.item_ids)
    table.config = {**sid_settings(cfg.sid), "dataset": cfg.dataset}
    path = sid_table_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    return table, table.save(path)


def _default(cfg, key: str):
    spec = next(f for f in fields(cfg) if f.name == key)
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def _fill(model_cfg, key: str, value) -> None:
    """Set a data-derived model size; a recipe that states another value than the default must
    state what the data has."""
    stated = getattr(model_cfg, key)
    if stated in (0, [], None) or stated == value or stated == _default(model_cfg, key):
        setattr(model_cfg, key, value)
        return
    raise ConfigError(f"model.{key}: the recipe says {stated} but {key} of the data is {value}; "
                      f"remove model.{key} (it is filled from the data)")


class RecommendationTask(TrainingTask):
    """Next-item recommendation on a `recsys:` log; a loss unit is one target impression."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.recsys is None:
            raise ConfigError(f"recsys: the {cfg.model.name} family trains on a recommendation log; "
                              f"add a recsys: section (see recipes/recsys/)")
        self.rec: RecsysConfig = cfg.recsys
        self.log = self.split = None
        self.history = None  # (indptr, items) per user: what is known before the validation target

    def prepare(self) -> None:
        self.log, self.split = load_split(self.rec)
        self.history = self.split.history("valid")
        self.fill_model_sizes(self.cfg.model)

    def fill_model_sizes(self, model_cfg) -> None:
        _fill(model_cfg, "n_items", self.log.n_items)

    def build_data(self, *, dp_rank: int, dp_size: int):
        train = self.cfg.train
        return build_rec_data(self.rec, global_batch=train.global_batch, micro_batch=train.micro_batch,
                              dp_rank=dp_rank, dp_size=dp_size, seed=train.seed)

    def with_inputs(self, batch: dict) -> dict:
        """The batch with whatever the family reads beyond the data's tensors (semantic IDs)."""
        return batch

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return model(self.with_inputs(batch))

    def units(self, batch: dict) -> torch.Tensor:
        return (batch["targets"] != 0).sum()

    def fingerprint(self, batch: dict) -> torch.Tensor:
        return batch["ctx_items"].sum() + batch["targets"].sum()

    unit_name = "impressions"  # a loss unit is one target impression

    def sample_shape(self) -> str:
        return f"context {self.rec.context_len} items, {self.rec.common_context} target(s)"

    def next_steps(self, run_dir: str) -> str:
        return f"keel recommend {run_dir} --split test --topk 10 --out {run_dir}/test-top10.jsonl"

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        c, k = self.rec.context_len, self.rec.common_context
        ones = lambda *shape: torch.ones(*shape, dtype=torch.long)  # noqa: E731  index 1 is valid everywhere
        return {"user": ones(rows), "user_feats": ones(rows, len(self.rec.user_features)),
                "ctx_items": ones(rows, c), "ctx_ratings": ones(rows, c), "ctx_gaps": ones(rows, c),
                "targets": ones(rows, k)}

    # ------------------------------------------------------------ ranking
    def item_scores(self, model, batch: dict) -> torch.Tensor:
        """Scores [B, n_items + 1] of every item for each row (column 0 = padding, -inf)."""
        raise NotImplementedError

    def target_ranks(self, model, batch: dict, history=None) -> torch.Tensor:
        """0-based rank of each row's first target among all items, known items masked."""
        scores = self.item_scores(model, self.with_inputs(batch)).float()
        targets = batch["targets"][:, 0].to(scores.device)
        if history is not None:
            scores = mask_history(scores, batch["user"], history, targets)
        return target_ranks(scores, targets)

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        real = batch["user"] != 0  # padding rows keep every rank's batch count equal
        sums = {"loss": self.loss_sum(model, batch).float(), "units": self.units(batch).float(),
                "users": real.sum().float()}
        ranks = self.target_ranks(model, batch, self.history if self.rec.mask_history else None).cpu().numpy()
        for name, per_user in ranking_metrics(ranks, self.rec.eval_topk).items():
            sums[name] = torch.tensor(float((per_user * real.cpu().numpy()).sum()))
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        users = max(sums["users"], 1)
        out = {"eval_loss": sums["loss"] / max(sums["units"], 1)}
        out.update({f"eval_{k}": v / users for k, v in sums.items() if "@" in k})
        return out


class SASRecTask(RecommendationTask):
    def fill_model_sizes(self, model_cfg) -> None:
        super().fill_model_sizes(model_cfg)
        _fill(model_cfg, "context_len", self.rec.context_len)

    @torch.no_grad()
    def item_scores(self, model, batch: dict) -> torch.Tensor:
        return model(batch, score_items=True)


class GenerativeRecTask(RecommendationTask):
    """Targets and context items as semantic IDs (OneRec-V2): the table must exist before training."""
    sids: torch.Tensor | None = None
    trie: SidTrie | None = None
    table: SidTable | None = None

    def prepare(self) -> None:
        super().prepare()
        path = sid_table_path(self.rec)
        table = self.table = SidTable.load(path, item_ids=self.log.item_ids)
        self.sids = torch.from_numpy(table.sids)
        self.trie = SidTrie.from_table(table.sids, table.sid_levels)
        self.sid_levels = list(table.sid_levels)
        _fill(self.cfg.model, "sid_levels", self.sid_levels)

    def fill_model_sizes(self, model_cfg) -> None:
        super().fill_model_sizes(model_cfg)
        rec = self.rec
        _fill(model_cfg, "n_users", self.log.n_users)
        _fill(model_cfg, "context_len", rec.context_len)
        _fill(model_cfg, "context_features", list(rec.context_features))
        _fill(model_cfg, "user_features", list(rec.user_features))
        _fill(model_cfg, "user_feature_sizes", [self.log.user_feat_sizes[n] for n in rec.user_features])
        _fill(model_cfg, "n_gaps", rec.gap_buckets)

    def with_inputs(self, batch: dict) -> dict:
        if "target_sids" in batch:  # already there (keel plan's fake batch)
            return batch
        device = batch["targets"].device
        sids = self.sids if self.sids.device == device else self.sids.to(device)
        self.sids = sids
        return {**batch, "ctx_sids": sids[batch["ctx_items"]], "target_sids": sids[batch["targets"]]}

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        batch = super().fake_batch(rows, cp)
        levels = len(self.cfg.model.sid_levels)
        batch["ctx_sids"] = torch.zeros(*batch["ctx_items"].shape, levels, dtype=torch.long)
        batch["target_sids"] = torch.zeros(*batch["targets"].shape, levels, dtype=torch.long)
        return batch

    @torch.no_grad()
    def item_scores(self, model, batch: dict) -> torch.Tensor:
        def step(owner, prefix):
            return model(batch, owner=owner, prefix=prefix)
        rows = batch["targets"].shape[0]
        if self.rec.eval_beam == 0:
            return score_all_items(step, self.trie, rows)
        # every item left in the beam: masking the user's known items afterwards must not empty the top K
        items, logp = beam_search(step, self.trie, rows, self.rec.eval_beam, self.rec.eval_beam)
        scores = torch.full((rows, self.log.n_items + 1), -float("inf"), device=logp.device)
        return scores.scatter_(1, items, logp).index_fill_(1, torch.zeros(1, dtype=torch.long,
                                                                          device=logp.device), -float("inf"))


def recommend(task: RecommendationTask, model, which: str, topk: int, micro_batch: int = 64,
              mask_known: bool = True):
    """(raw user id, [raw item ids best first]) for every user of the valid or test split, one
    process. Known items (those before the split's target) are left out when mask_known."""
    beam = getattr(task, "trie", None) is not None and task.rec.eval_beam
    if beam and topk > beam:
        raise ConfigError(f"--topk: {topk} is more than the beam search keeps (recsys.eval_beam {beam}); "
                          f"raise recsys.eval_beam or set it to 0 (exact ranking of every item)")
    data = build_rec_data(task.rec, global_batch=1, micro_batch=1, dp_rank=0, dp_size=1, seed=0)
    history = task.split.history(which) if mask_known else None
    for batch in data.split_batches(which, micro_batch, 0, 1):
        real = batch["user"] != 0
        if not real.any():
            continue
        scores = task.item_scores(model, task.with_inputs(batch)).float()
        if history is not None:  # column 0 stands in for the target mask_history would keep
            scores = mask_history(scores, batch["user"], history, torch.zeros_like(batch["user"]))
        best = scores.topk(min(topk, scores.shape[1] - 1), dim=1).indices.cpu().numpy()
        for row in np.flatnonzero(real.numpy()):
            user = int(batch["user"][row])
            yield task.log.user_ids[user], [task.log.item_ids[i] for i in best[row] if i != 0]
