"""The on-policy distillation trainer (`keel rl`, rl.trainer: opd): the step loop around the
objective pieces of keel/rl/distill.py (routing, CaMOPD selection, signals, teacher scoring)."""
from __future__ import annotations

import time
from collections import OrderedDict

import torch

from keel.errors import ConfigError
from keel.model.lora import apply_lora, has_lora, merged_state_dict
from keel.rl.config import register_rl_trainer
from keel.rl.distill import (AlternatingSchedule, OPDConfig, build_opd_config, distill_loss_sum, gap_scores,
                             pack_rollouts, route_teachers, select_by_gap, student_scores, teacher_scores)
from keel.rl.engines import SamplingParams, build_engine
from keel.rl.grpo import GRPOTrainer
from keel.rl.prompts import load_prompts
from keel.rl.run import PromptStream, RLRun
from keel.rl.scoring import full_vocab_kl, response_logprobs
from keel.rl.sharding import whole_parameters
from keel.train.optim import adapter_optimizer

# RLRun.prompt_seed streams: each prompt source draws apart from the others.
STREAMS = {"general": 0, "domain": 1}
EVAL_STREAM = 2


@register_rl_trainer("opd", subsection=OPDConfig)
class OPDTrainer(RLRun):
    """Each step: [CaMOPD: pick the branch] -> prompts_per_step prompts -> group_size student samples
    each (rollout engine) -> teachers score them (routed by source) -> [CaMOPD: keep the high-gap
    samples] -> distillation loss in micro-batches of rl.micro_batch sequences -> one optimizer
    step -> weights to the engine. Each prompt's samples are seeded by its place in its stream, so
    resume is exact and the run does not depend on its number of ranks. Under torchrun (FSDP2
    student and teachers) each rank generates its share and trains on its share of the kept samples;
    the teachers score the whole step's batch on every rank (each rank must run every sharded teacher
    equally often; this repeats that scoring on every rank)."""
    runs_sharded = True

    _stop_ids = GRPOTrainer._stop_ids
    encode_prompt = GRPOTrainer.encode_prompt
    fitting_prompts = GRPOTrainer.fitting_prompts

    @classmethod
    def validate_config(cls, rl) -> None:
        if not rl.prompts:
            raise ConfigError("rl.prompts: required, a prompt source (for CaMOPD: the general prompts)")
        build_opd_config(rl.opd)

    def setup(self) -> None:
        rl, seed = self.rl, self.cfg.train.seed
        self.opd = build_opd_config(rl.opd)
        self.camopd = self.opd.camopd
        self.schedule = AlternatingSchedule(self.camopd.n_general) if self.camopd else None
        self.stop_ids, self._encoded = self._stop_ids(), OrderedDict()
        if self.ranks.sharded and (self.opd.lora is not None or rl.engine != "native"):
            raise ConfigError("rl.opd.lora: adapters train on one process only for now (and rl.engine must be "
                              "native under torchrun)" if self.opd.lora is not None else
                              f"rl.engine: {rl.engine} rolls out for one trainer process only for now; under "
                              f"torchrun use rl.engine: native")
        self.engine = build_engine(rl.engine, self.policy, rl)  # a plain copy: LoRA is merged on sync
        if self.opd.lora is not None:
            apply_lora(self.policy, self.opd.lora, "rl.opd.lora")
            self.optimizer, self.scheduler = adapter_optimizer(self.policy, self.cfg.optim,
                                                                self.total_steps * self.updates_per_step)
        self.teachers = {name: self._load_teacher(name, spec) for name, spec in self.opd.teachers.items()}
        self.prompts = PromptStream(self.fitting_prompts(load_prompts(rl.prompts), "rl.prompts"), seed)
        self.domain_prompts = None
        if self.camopd:
            key = "rl.opd.camopd.domain_prompts"
            self.domain_prompts = PromptStream(self.fitting_prompts(load_prompts(self.camopd.domain_prompts, key=key),
                                                                    key), seed + 1)
        self.eval_items = (self.fitting_prompts(load_prompts(rl.eval_prompts, key="rl.eval_prompts"), "rl.eval_prompts")
                           if rl.eval_prompts else [])

    def _load_teacher(self, name: str, spec: str) -> torch.nn.Module:
        model, tokenizer = self.load_model(spec, trainable=False)  # FSDP-sharded under torchrun
        if tokenizer.hf.get_vocab() != self.tokenizer.hf.get_vocab():
            raise ConfigError(f"rl.opd.teachers.{name}: {spec} has another tokenizer than rl.policy; "
                              "teachers must score the student's tokens")
        return model

    def _teacher_of(self, sources: list[str], branch: str) -> list[str]:
        default = self.opd.default_teacher
        if self.camopd:  # an unrouted prompt goes to its branch's teacher
            default = self.camopd.domain_teacher if branch == "domain" else self.camopd.general_teacher
        elif default is None and len(self.teachers) == 1:
            default = next(iter(self.teachers))
        return route_teachers(sources, self.opd.routes, default)

    def _sample(self, items, branch: str, first_position: int, stream: int):
        """(DistillBatch on the device, the engine's logprobs [B, L], rollouts, the slowest rank's seconds)."""
        s = self.rl.sampling
        prompt_ids = [self.encode_prompt(it.prompt) for it in items]
        params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                stop_ids=self.stop_ids, n=self.rl.group_size)
        rollouts, _, seconds = self.generate_shares(prompt_ids, params, first_position, stream)
        teachers = self._teacher_of([items[r.prompt_index].source for r in rollouts], branch)
        batch = pack_rollouts([prompt_ids[r.prompt_index] for r in rollouts], [r.tokens for r in rollouts],
                              teachers, self.tokenizer.pad_id)
        engine_logps = torch.zeros(batch.input_ids.shape)
        engine_logps[batch.response_mask] = torch.tensor([lp for r in rollouts for lp in r.logprobs])
        batch.input_ids, batch.response_mask = batch.input_ids.to(self.device), batch.response_mask.to(self.device)
        return batch, engine_logps.to(self.device), rollouts, seconds

    def train_step(self) -> dict:
        rl = self.rl
        branch = self.schedule.branch(self.step) if self.schedule else "general"
        stream = self.domain_prompts if branch == "domain" else self.prompts
        first = stream.position
        batch, engine_logps, rollouts, rollout_s = self._sample(stream.take(rl.prompts_per_step), branch, first,
                                                                STREAMS[branch])
        self.engine.sleep()  # frees a colocated engine's memory for training (the update wakes it)
        with torch.no_grad(), self.autocast():  # teachers score in the precision the student trains in
            teacher_logps, _ = teacher_scores(self.teachers, batch, micro_batch=rl.micro_batch,
                                              every_teacher=self.ranks.sharded)
        keep = self.camopd.keep_fraction if self.camopd else 1.0
        if rl.sampling.temperature == 1.0:  # the engine's log-probs are the student's own
            student_logps = engine_logps
        else:
            with torch.no_grad():
                student_logps = student_scores(self.policy, batch, rl.micro_batch)
        mask = batch.response_mask.float()
        scores = gap_scores(student_logps, teacher_logps, mask)
        kept = select_by_gap(scores.cpu(), keep).tolist()
        kept_batch, kept_teacher = batch.rows(kept), teacher_logps[torch.tensor(kept, device=self.device)]
        total_tokens = max(int(kept_batch.response_mask.sum()), 1)
        self.policy.train()
        loss_total, sums = 0.0, {}
        for part, counted in self._my_parts(len(kept)):
            with self.autocast():
                loss_sum, part_sums = distill_loss_sum(self.policy, self.teachers, kept_batch.rows(part),
                                                       self.opd.signal, kept_teacher[torch.tensor(part)],
                                                       every_teacher=self.ranks.sharded)
            # A share of the step's token mean; FSDP's average over the ranks undone.
            (loss_sum * (counted * self.ranks.dp_size / total_tokens)).backward()
            if not counted:
                continue
            loss_total += loss_sum.item() / total_tokens
            for key, value in part_sums.items():
                sums[key] = sums.get(key, 0) + value
        loss_total, sums = self.ranks.all_sum([loss_total])[0], self.ranks.sum_dict(sums)
        gap = (student_logps - teacher_logps) * mask
        row = {"loss": loss_total, "domain_step": float(branch == "domain"),
               "reverse_kl_sampled": (gap.sum() / mask.sum().clamp(min=1)).item(),
               "gap_mean": scores.mean().item(), "gap_kept": scores[kept].mean().item(),
               "kept_fraction": len(kept) / len(scores), "trained_tokens": total_tokens,
               "response_len_mean": mask.sum().item() / len(rollouts),
               "rollout_tokens_per_s": mask.sum().item() / max(rollout_s, 1e-9)}
        if "reverse_kl_full" in sums:
            row["reverse_kl_full_kept"] = sums["reverse_kl_full"] / total_tokens
        for name in sorted(set(batch.teachers)):
            rows = torch.tensor([t == name for t in batch.teachers], device=self.device)[:, None] * mask
            row[f"reverse_kl_sampled/{name}"] = ((gap * rows).sum() / rows.sum().clamp(min=1)).item()
        row.update(self.optimizer_step())
        row["sync_s"] = self.sync_weights()
        return row

    def _my_parts(self, rows: int) -> list:
        """(row indices, counted) of this rank's micro-batches over its share of `rows` kept samples;
        a rank short of rows repeats row 0 with weight 0 (every rank runs as many, for FSDP)."""
        share, size = self.ranks.share(rows), self.rl.micro_batch
        parts = [(list(range(i, min(i + size, share.stop))), 1) for i in range(share.start, share.stop, size)]
        return parts + [([0], 0)] * (self.ranks.micro_batch_count(rows, size) - len(parts))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Reverse KL to the routed teachers on the held-out prompts' student samples (a fixed seed,
        so evaluations are comparable): exact over the vocabulary at each sampled prefix, and the
        sampled-token estimate."""
        if not self.eval_items:
            return {}
        self.policy.eval()
        batch, _, _, _ = self._sample(self.eval_items, "general", 0, EVAL_STREAM)
        student, student_full = response_logprobs(self.policy, batch.input_ids, batch.response_mask, True)
        teacher, teacher_full = teacher_scores(self.teachers, batch, True, every_teacher=self.ranks.sharded)
        tokens = batch.response_mask.sum().clamp(min=1)
        return {"eval_reverse_kl": (full_vocab_kl(student_full, teacher_full).sum() / tokens).item(),
                "eval_reverse_kl_sampled": ((student - teacher)[batch.response_mask].sum() / tokens).item()}

    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        named = merged_state_dict(self.policy).items() if has_lora(self.policy) else whole_parameters(self.policy)
        self.engine.update_weights(named, self.step)
        return time.perf_counter() - t0

    def after_resume(self) -> None:
        self.sync_weights()

    def state_dict(self) -> dict:
        state = {"prompts": self.prompts.state_dict()}
        if self.domain_prompts is not None:
            state["domain_prompts"] = self.domain_prompts.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.prompts.load_state_dict(state["prompts"])
            if self.domain_prompts is not None:
                self.domain_prompts.load_state_dict(state["domain_prompts"])
