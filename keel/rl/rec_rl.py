"""Recommender RL on a generative recommender (OneRec-V2): `rl.trainer: rec`.

Each step, for rl.prompts_per_step training samples (a user's context before one of their
impressions, in a seeded resumable order):
  rollouts  G = rl.group_size items per user from the current policy: constrained beam search over
            the catalogue's semantic IDs (`rl.rec.rollout: beam`, OneRec's choice: the beam is the
            group), or unconstrained ancestral sampling of the SID codes (`sample`, which can emit
            a code path that is no item: what the format reward is for)
  rewards   the weighted rewards of rl.rec.rewards (keel/rl/rec_rewards.py: logged user feedback with
            duration-aware shaping, format legality); NaN = nothing known about that item
  advantage rl.advantage over the items with a reward (`duration_aware`: +1 / -1 / 0 as OneRec-V2;
            `grpo`: group-normalised per user); items without one get 0
  loss      rl.loss (`gbpo` or `ecpo`, keel/rl/rec_objectives.py) on the items' code log-probs,
            pi_old being the probabilities the rollout recorded (rl.rec.pi_old),
            plus rl.rec.sft_weight x RSFT: the next-item loss on the same samples' logged targets,
            the bottom rl.rec.rsft_drop share of the batch by engagement left out (OneRec's joint
            RSFT + RL; the engagement is the play time, or the rating where the log has none)
  eval      HR@K / NDCG@K on the validation split, the same ranking keel train reports

The policy is a keel run of a generative recommender; the rollout model is the policy itself (on
policy, one optimizer update per step), so pi_old is the policy's own probability at rollout time:
it equals sg(pi) up to what differs between generating and training (dropout, a temperature).

Under torchrun (keel/rl/sharding.py) the policy is FSDP2-sharded and each data-parallel rank rolls
out, scores and trains on its contiguous share of the step's users; the rollouts are gathered, so
the rewards, the advantages (OneRec-V2's batch-wide top-quartile threshold included) and the RSFT
cut are computed on the whole step exactly as on one process, and the loss is normalised by the
whole step's counts. Beam rollouts only (sampled ones draw from one generator over the batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.distributed.fsdp import register_fsdp_forward_method

from keel.checkpoint.files import resolve_checkpoint
from keel.checkpoint.model_io import checkpoint_recipe, load_model
from keel.config import build_dataclass
from keel.data.loader import collate
from keel.data.rec_config import RecsysConfig
from keel.data.recsys import eval_samples, train_samples
from keel.errors import CheckpointError, ConfigError
from keel.model.registry import get_model_spec
from keel.model.sid_beam import beam_search
from keel.rl import losses
from keel.rl.advantages import compute_advantages
from keel.rl.config import check_registries, loss_options, register_rl_trainer
from keel.rl.rec_rewards import UserView, check_rec_rewards, combined_rewards, engagement_of, rec_reward_options
from keel.rl.plan import register_step_plan
from keel.rl.run import PromptStream, RLRun
from keel.rl.sharding import build_sharded_policy


@dataclass
class RecRLConfig:
    """rl.trainer rec: rollouts, rewards and the RSFT term."""
    rollout: Literal["beam", "sample"] = "beam"  # constrained beam search (the group = the beam) or free sampling
    temperature: float = 1.0  # rollout sample: softmax temperature of each code
    # GBPO / ECPO's pi_old: `rollout`, the code probabilities the rollout recorded as it generated
    # (the logged generation probability; for `sample`, the tempered distribution drawn from), or
    # `current`, sg(pi) of the training forward (what the losses fall back to where no log has one)
    pi_old: Literal["rollout", "current"] = "rollout"
    rewards: dict = field(default_factory=lambda: {"feedback": 1.0})  # reward name -> weight
    reward_cfg: dict = field(default_factory=dict)  # reward name -> its options (keel/rl/rec_rewards.py)
    sft_weight: float = 1.0  # weight of the RSFT next-item loss beside the RL loss (0: RL alone)
    rl_weight: float = 1.0  # weight of the RL loss (0: RSFT alone, the control RL is measured against)
    rsft_drop: float = 0.5  # RSFT: share of the batch's targets with the lowest engagement left out
    eval_users: int = 0  # validation users scored at eval (0: all)
    # Training samples (a fixed seeded set) whose rollouts' rewards are measured at eval: the mean
    # reward per recommended item, unknown counting 0 (eval_reward), and the share with a known one
    reward_eval_samples: int = 256


def build_rec_rl_config(raw) -> RecRLConfig:
    cfg = raw if isinstance(raw, RecRLConfig) else build_dataclass(RecRLConfig, raw or {}, "rl.rec")
    if not cfg.rewards:
        raise ConfigError("rl.rec.rewards: name at least one reward, e.g. {feedback: 1.0}")
    for name in cfg.rewards:
        rec_reward_options(name, cfg.reward_cfg.get(name))
    for name in cfg.reward_cfg:
        if name not in cfg.rewards:
            raise ConfigError(f"rl.rec.reward_cfg.{name}: options for a reward rl.rec.rewards does not use")
    if cfg.temperature <= 0:
        raise ConfigError(f"rl.rec.temperature: must be > 0, got {cfg.temperature}")
    if not 0.0 <= cfg.rsft_drop < 1.0:
        raise ConfigError(f"rl.rec.rsft_drop: must be in [0, 1), got {cfg.rsft_drop}")
    for key in ("sft_weight", "rl_weight", "eval_users", "reward_eval_samples"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"rl.rec.{key}: must be >= 0, got {getattr(cfg, key)}")
    if cfg.sft_weight == 0 and cfg.rl_weight == 0:
        raise ConfigError("rl.rec.sft_weight and rl.rec.rl_weight: both 0 leaves nothing to train")
    return cfg


def policy_recsys_section(policy: str) -> dict:
    """The recsys: section the policy was trained with (its data and semantic-ID table)."""
    try:
        path = resolve_checkpoint(Path(policy).expanduser())
    except CheckpointError as e:
        raise ConfigError(f"rl.policy: {e} (train a recommender first, e.g. keel train "
                          f"recipes/recsys/onerec-tiny.yaml, and pass its run directory)") from None
    raw = checkpoint_recipe(path)
    if not isinstance(raw.get("recsys"), dict):
        raise ConfigError(f"rl.policy: {policy} was not trained on a recsys: log (no recsys section in its config)")
    return raw["recsys"]


@register_step_plan("rec")
class RecRLStepPlan:
    """One rank's rec-RL step for `keel plan`: its users' G beam items scored with gradient (the RL
    term's graph: code_logprobs over users x G items) and the same users' RSFT next-item loss, in one
    forward and backward as train_step runs them. The beam search runs without gradient and holds
    less; a reward model's forward (rl.rec.rewards.reward_model) is not counted."""

    def __init__(self, cfg):
        self.task = get_model_spec(cfg.model.name).task(cfg)
        self.group, self.levels = cfg.rl.group_size, len(cfg.model.sid_levels)

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        batch = self.task.fake_batch(rows, cp)
        batch["beam_codes"] = torch.zeros(rows, self.group, self.levels, dtype=torch.long)
        return batch

    def loss_sum(self, model, batch: dict):
        batch = dict(batch)
        codes = batch.pop("beam_codes")
        register_fsdp_forward_method(model, "code_logprobs")  # as the sharded trainer does (a no-op unsharded)
        return model.code_logprobs(batch, codes).float().sum() + model(batch)

    def sample_shape(self) -> str:
        return f"({self.task.sample_shape()} + a beam of {self.group} items)"


@register_rl_trainer("rec", subsection=RecRLConfig)
class RecRLTrainer(RLRun):
    runs_sharded = True

    @classmethod
    def validate_config(cls, rl) -> None:
        build_rec_rl_config(rl.rec)
        check_registries(rl)
        if rl.mini_batches != 1:
            raise ConfigError(f"rl.mini_batches: the rec trainer makes one update per step (pi_old = the rollout "
                              f"policy), got {rl.mini_batches}")

    def __init__(self, cfg):
        if cfg.rl is not None:  # the data and SID table are the policy's own, whatever the recipe says
            trained = build_dataclass(RecsysConfig, policy_recsys_section(cfg.rl.policy), "recsys")
            if cfg.recsys is not None and (cfg.recsys.dataset, cfg.recsys.sid) != (trained.dataset, trained.sid):
                raise ConfigError(f"recsys: the recipe's dataset/sid differ from those rl.policy {cfg.rl.policy} "
                                  f"was trained on; drop the recipe's recsys section")
            cfg.recsys = trained if cfg.recsys is None else cfg.recsys
        super().__init__(cfg)

    def load_model(self, spec: str, trainable: bool = True):
        if self.ranks.sharded:  # rollouts and scoring call forward() and code_logprobs()
            model, _ = build_sharded_policy(spec, self.cfg, self.ranks, trainable, ("code_logprobs",), False)
        else:
            model = load_model(spec, str(self.device))
        if not hasattr(model, "code_logprobs"):
            raise ConfigError(f"rl.policy: {spec} is a {model.config.name!r} model; the rec trainer needs a "
                              f"generative recommender (onerec)")
        return model.train().requires_grad_(trainable), None

    def setup(self) -> None:
        self.rec = build_rec_rl_config(self.rl.rec)
        self.reward_options = {name: rec_reward_options(name, self.rec.reward_cfg.get(name)) for name in self.rec.rewards}
        self.task = get_model_spec(self.cfg.model.name).task(self.cfg)
        self.task.prepare()
        check_rec_rewards(self.reward_options, self.task)
        if self.rec.rollout == "beam" and self.rl.group_size > self.task.log.n_items:  # a beam holds distinct items
            raise ConfigError(f"rl.group_size: {self.rl.group_size} items per user, but the catalogue has "
                              f"{self.task.log.n_items}")
        if self.ranks.sharded and self.rec.rollout != "beam":
            raise ConfigError("rl.rec.rollout: sample draws from one generator over the whole batch, so it runs on "
                              "one process only for now; use beam under torchrun")
        if self.rl.prompts_per_step < self.ranks.dp_size:
            raise ConfigError(f"rl.prompts_per_step: {self.rl.prompts_per_step} users for {self.ranks.dp_size} "
                              f"data-parallel ranks; every rank needs at least one")
        self.samples = train_samples(self.task.split, self.task.rec)
        self.stream = PromptStream(list(range(len(self.samples))), self.cfg.train.seed)

    def next_steps(self, run_dir: str) -> str:
        return self.task.next_steps(run_dir)

    def state_dict(self) -> dict:
        return {"samples": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "samples" in state:
            self.stream.load_state_dict(state["samples"])

    # ------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollouts(self, batch: dict, generator: torch.Generator):
        """(items [B, G], codes [B, G, L], the log-prob the rollout gave each code [B, G, L]); item 0
        where a sampled code path is no catalogue item."""
        model, g = self.policy, self.rl.group_size
        model.eval()
        rows = batch["targets"].shape[0]

        def step(owner, prefix):
            with self.autocast():
                return model(batch, owner=owner.to(self.device), prefix=prefix.to(self.device)).float()
        try:
            if self.rec.rollout == "beam":
                items, _, code_logp = beam_search(step, self.task.trie, rows, g, g, code_logp=True)
                # a padded beam slot (fewer legal items than G) is item 0, masked out of the loss
                code_logp = code_logp.cpu().nan_to_num(neginf=0.0)
                return items.cpu(), self.task.sids[items.to(self.task.sids.device)].cpu(), code_logp
            owner = torch.arange(rows).repeat_interleave(g)
            codes = torch.zeros(rows * g, 0, dtype=torch.long)
            drawn = []
            for _ in self.task.sid_levels:
                logp = torch.log_softmax(step(owner, codes).cpu() / self.rec.temperature, -1)
                code = torch.multinomial(logp.exp(), 1, generator=generator)
                codes, drawn = torch.cat([codes, code], 1), drawn + [logp.gather(1, code)]
            items = self.task.trie.item_of(codes).view(rows, g)
            return items, codes.view(rows, g, -1), torch.cat(drawn, 1).view(rows, g, -1)
        finally:
            model.train()

    # ------------------------------------------------------------ one step
    def _batch(self, indices: list[int]) -> dict:
        rows = [self.samples[i] for i in indices]
        return {k: v.to(self.device) for k, v in self.task.with_inputs(collate(rows)).items()}

    def _rollouts_of(self, indices: list[int], generator: torch.Generator):
        """(this rank's batch, its share of `indices`, and of all of them: items [P, G], codes and the
        rollout's code log-probs [P, G, L]): each rank rolls out its share and the shares are gathered
        (on one process: all of them)."""
        share = self.ranks.share(len(indices))
        batch = self._batch([indices[i] for i in share])
        gathered = self.ranks.gather([self.rollouts(batch, generator)])  # one triple per data-parallel rank
        return (batch, share, *(torch.cat([g[i] for g in gathered]) for i in range(3)))

    def _rsft_keep(self, indices: list[int], positions: np.ndarray) -> torch.Tensor:
        """[P, K] bool: the step's targets RSFT trains on, all but those below the step's rl.rec.rsft_drop
        quantile of engagement (targets tied with the cut are kept, so with ratings a little more stays)."""
        targets = collate([self.samples[i] for i in indices])["targets"]
        k = targets.shape[1]
        pos = positions[:, None] + np.arange(k)[None, :]
        valid = targets.numpy() != 0
        engagement = engagement_of(self.task.split)[np.where(valid, pos, 0)]
        cut = np.quantile(engagement[valid], self.rec.rsft_drop) if self.rec.rsft_drop > 0 else -np.inf
        return torch.from_numpy(valid & (engagement >= cut))

    def train_step(self) -> dict:
        first = self.stream.position
        indices = self.stream.take(self.rl.prompts_per_step)
        positions = self.samples.positions[indices]
        users = self.samples.user_of[positions]
        generator = torch.Generator().manual_seed(self.prompt_seed(first))
        batch, share, items, codes, rollout_logp = self._rollouts_of(indices, generator)
        mine = slice(share.start, share.stop)
        view = UserView(self.task.split, positions, users)
        rewards = combined_rewards(self.rec.rewards, self.reward_options, view, items, codes, generator)

        known = ~torch.isnan(rewards)
        group = torch.arange(items.shape[0])[:, None].expand_as(items)
        state: dict = {}
        advantages = torch.zeros(items.shape)
        if known.any():
            tasks = ["rec"] * int(known.sum())
            advantages[known] = compute_advantages(self.rl.advantage, rewards[known], group[known], tasks,
                                                   self.rl.advantage_cfg, state)
        row = self._update(batch, share, indices, positions, items, codes, rollout_logp, advantages)
        row.update(state.get("metrics", {}))
        n = items.numel()
        hits = float((items[mine] == batch["targets"][:, :1].cpu()).any(1).float().sum())  # this rank's users
        row.update({"reward/mean": float(rewards[known].mean()) if known.any() else float("nan"),
                    "reward/known_fraction": float(known.float().mean()),
                    "rollout/legal_fraction": float((items != 0).float().mean()),
                    "rollout/unique_items": float(sum(len(set(r.tolist())) for r in items) / n),
                    "rollout/target_hit_rate": self.ranks.all_sum([hits])[0] / len(indices)})
        return row

    def _update(self, batch: dict, share: range, indices: list, positions: np.ndarray, items, codes,
                rollout_logp, advantages) -> dict:
        """One optimizer update on this rank's users, rl.micro_batch at a time: the RL loss on their
        beams plus RSFT on their targets, every term normalised by the whole step's counts (so the
        micro-batches' and ranks' gradients sum to one process's). Returns the step's metrics."""
        legal = (items != 0)[..., None].expand_as(codes)  # [P, G, L], the whole step's
        scale = losses.LossScale(tokens=float(legal.sum()), sequences=float(items.numel()))
        keep = self._rsft_keep(indices, positions) if self.rec.sft_weight > 0 else None
        kept = max(int(keep.sum()), 1) if keep is not None else 1
        size, own = self.rl.micro_batch, len(share)
        slices = [(lo, min(lo + size, own), 1) for lo in range(0, own, size)]
        counted = len(slices)
        # Every rank runs as many micro-batches as the largest share needs (FSDP's gathers must line
        # up); a short rank repeats its first users with the loss weighted 0.
        slices += [(0, 1, 0)] * (-(-len(self.ranks.share(len(indices), 0)) // size) - counted)
        flat = lambda t: t.flatten(0, 1)  # noqa: E731  [b*G, L]
        totals: dict = {}
        self.policy.take_moe_aux_loss()  # the rollouts' forwards leave nothing to train on
        for lo, hi, weight in slices:
            rows = slice(share.start + lo, share.start + hi)  # the step's rows of this micro-batch
            part = {k: v[lo:hi] if torch.is_tensor(v) and v.dim() and v.shape[0] == own else v for k, v in batch.items()}
            with self.autocast():
                logp = self.policy.code_logprobs(part, codes[rows].to(self.device)).float()  # [b, G, L]
            # Per token of this forward: the mean over micro-batches and ranks (FSDP's average undone below).
            aux = self.policy.take_moe_aux_loss() / (self.ranks.dp_size * counted)
            old = rollout_logp[rows].to(self.device) if self.rec.pi_old == "rollout" else logp.detach()
            rl_loss, metrics = losses.policy_loss(self.rl.loss, flat(logp), flat(old),
                                                  advantages[rows].flatten().to(self.device),
                                                  flat(legal[rows].to(self.device)), loss_options(self.rl),
                                                  agg=self.rl.loss_agg, scale=scale)
            loss = self.rec.rl_weight * rl_loss + aux
            terms = {"loss/rl": float(rl_loss.detach())}
            if keep is not None:
                targets = torch.where(keep[rows].to(self.device), part["targets"], 0)
                with self.autocast():
                    sft = self.policy({**part, "targets": targets}).float() / kept
                loss = loss + self.rec.sft_weight * sft
                terms["loss/sft"] = float(sft.detach())
            (loss * (self.ranks.dp_size * weight)).backward()  # FSDP averages gradients over the ranks: undo it
            if not weight:
                continue
            terms["loss"] = float(loss.detach())
            fraction = (hi - lo) / len(indices)  # per-item means, weighted by the users they cover
            for key, value in metrics.items():
                terms[key] = value if key.startswith("loss/") else value * fraction
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
        row = self.optimizer_step()
        row.update(self.ranks.sum_dict(totals))
        if keep is not None:
            row["rsft/kept_targets"] = int(keep.sum())
        return row

    # ------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.policy.eval()
        try:
            sums: dict = {}
            batches = self._eval_batches(self.rec.eval_users or None)
            # This rank's batches, every dp_size-th; each rank runs as many as the first (FSDP's
            # gathers must line up), a short one repeating a batch it does not count.
            mine = batches[self.ranks.dp_rank::self.ranks.dp_size]
            most = len(batches[0::self.ranks.dp_size])
            for i, batch in enumerate(mine + [batches[0]] * (most - len(mine))):
                with self.autocast():
                    values = self.task.eval_sums(model, batch)
                if i < len(mine):
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
            return {**self.task.eval_metrics(self.ranks.sum_dict(sums)), **self._reward_eval()}
        finally:
            model.train()

    def _reward_eval(self) -> dict:
        """The rewards of the current policy's rollouts for a fixed set of training samples (the same
        samples, seeds and rewards at every eval, so the numbers compare across steps)."""
        n = min(self.rec.reward_eval_samples, len(self.samples))
        if n == 0:
            return {}
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.cfg.train.seed + 1))
        chosen = order[:n].tolist()
        total, known, count = 0.0, 0, 0
        for lo in range(0, n, self.rl.prompts_per_step):
            indices = chosen[lo:lo + self.rl.prompts_per_step]
            positions = self.samples.positions[indices]
            generator = torch.Generator().manual_seed(self.prompt_seed(lo, stream=1))
            _, _, items, codes, _ = self._rollouts_of(indices, generator)
            view = UserView(self.task.split, positions, self.samples.user_of[positions])
            rewards = combined_rewards(self.rec.rewards, self.reward_options, view, items, codes, generator)
            seen = ~torch.isnan(rewards)
            total += float(rewards[seen].sum())
            known += int(seen.sum())
            count += rewards.numel()
        return {"eval_reward": total / count, "eval_reward_known_fraction": known / count}

    def _eval_batches(self, limit):
        dataset = eval_samples(self.task.split, "valid", self.task.rec)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        size = self.rl.micro_batch
        return [{k: v.to(self.device) for k, v in collate([dataset[i] for i in range(lo, min(count, lo + size))]).items()}
                for lo in range(0, count, size)]
