"""What every RL trainer (grpo, dpo, opd) shares: the policy, optimizer, checkpoint + resume,
metrics, and the trainer-side log-probability recompute.

A trainer subclasses RLRun and writes `train_step()` (one optimizer step's worth of work, returning
its metrics row); it may add `evaluate()`, `state_dict()` / `load_state_dict()` for its own
resumable state (prompt position, estimator state: plain Python and tensors) and
`validate_config(rl_cfg)` for its own config checks. RLRun does the rest:

  setup    policy from `rl.policy` (`smollm2`, an HF folder/.gguf, or a keel run/checkpoint) ->
           optimizer + LR schedule (keel/train/optim.py, over rl.steps) -> resume -> metrics
  loop     train_step -> optimizer step (grad clip) -> metrics.jsonl / wandb -> checkpoint every N;
           SIGUSR1/SIGTERM (SLURM preemption): stop after the step on a checkpoint, leave PREEMPTED
           (keel/train/faults.py), exit so the job can be requeued
  resume   policy, optimizer, scheduler, step, the trainer's state and every RNG, from the newest
           committed (atomic) checkpoint (keel/checkpoint/dcp.py); a killed run picks up exactly
           where its last checkpoint left it.

The run directory is a normal keel run: `keel.load(run_dir)` gives the trained policy and
`keel export hf run_dir OUT` converts it for transformers / vLLM.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

from keel.checkpoint.dcp import Checkpointer
from keel.checkpoint.files import resolve_checkpoint, tokenizer_dir_of
from keel.checkpoint.hf import load_hf, locate
from keel.checkpoint.model_io import load_model
from keel.config import Config, save_resolved
from keel.data.tokenizer import Tokenizer
from keel.errors import ConfigError
from keel.model.registry import build_model
from keel.rl.sharding import RLRanks, build_sharded_policy, is_keel_checkpoint
from keel.train import faults
from keel.train.metrics import MetricsLogger, ProgressLine
from keel.train.optim import build_optimizer, clip_grad_norm
from keel.train.precision import slow_bf16_warning

# ------------------------------------------------------------------ policy

def load_policy(spec: str, device: torch.device | str = "cpu"):
    """(model in fp32 on `device`, keel Tokenizer) from `smollm2`, an HF folder/.gguf, or a keel run."""
    path = Path(spec).expanduser()
    if spec != "smollm2" and path.exists() and is_keel_checkpoint(path):
        ckpt = resolve_checkpoint(path)
        folder = tokenizer_dir_of(ckpt)
        if folder is None:
            raise ConfigError(f"rl.policy: {path} has no tokenizer/ folder saved with it")
        return load_model(ckpt, str(device)).train(), Tokenizer.load(str(folder))
    model_cfg, state_dict, hf_tokenizer = load_hf(spec)
    if hf_tokenizer is None:
        raise ConfigError(f"rl.policy: {spec} has no tokenizer files")
    model = build_model(model_cfg, "meta")
    model.to_empty(device=device)
    model.init_buffers()
    model.load_state_dict(state_dict, strict=True)
    folder, gguf = locate(spec)
    if gguf:  # the tokenizer lives inside the .gguf file
        return model.train(), Tokenizer(hf_tokenizer, Path(gguf).stem, folder)
    return model.train(), Tokenizer.load(str(folder))


# ------------------------------------------------------------------ prompt order

class PromptStream:
    """Items in a shuffled order that is a pure function of (seed, position): each epoch is a
    fresh permutation seeded by seed + epoch, so the position alone restores the stream exactly."""

    def __init__(self, items: list, seed: int, shuffle: bool = True):
        if not items:
            raise ConfigError("rl.prompts: the prompt source produced no prompts")
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.position = 0
        self._epoch, self._order = -1, []

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.items), generator=g).tolist()
            else:
                self._order = list(range(len(self.items)))
            self._epoch = epoch
        return self._order[offset]

    def item_at(self, position: int):
        return self.items[self._index(position)]

    def take(self, count: int) -> list:
        out = [self.item_at(self.position + i) for i in range(count)]
        self.position += count
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


# ------------------------------------------------------------------ JSON-safe trainer state

def to_jsonable(value):
    """Trainer/estimator state (dicts, lists, numbers, tensors) as JSON; tensors are tagged."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def from_jsonable(value):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------ the shared run

class RLRun:
    """Policy + optimizer + checkpoints + metrics for one RL trainer; see the module docstring."""

    # A trainer that lays its step out over data-parallel ranks (keel/rl/sharding.py) says so.
    runs_sharded = False

    def __init__(self, cfg: Config):
        if cfg.rl is None:
            raise ConfigError("rl: this recipe has no rl section (use `keel train` for pretraining/SFT)")
        self.cfg, self.rl = cfg, cfg.rl
        self.ranks = RLRanks.start(cfg)
        if self.ranks.sharded and not self.runs_sharded:
            raise ConfigError(f"rl.trainer: {self.rl.trainer} runs on one process only for now (grpo runs on "
                              f"many); start it without torchrun")
        self.dist, self.device = self.ranks.dist, self.ranks.dist.device
        for key, value in (("precision.dtype", cfg.precision.dtype), ("rl.engine_dtype", self.rl.engine_dtype)):
            warning = value in ("bf16", "bfloat16") and slow_bf16_warning(key, self.device)
            if warning and self.ranks.is_main:
                print(warning, file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed)
        self.run_dir = Path(cfg.run.out_dir)
        self.policy, self.tokenizer = self.load_model(self.rl.policy)
        if self.policy.config.name != cfg.model.name:
            raise ConfigError(f"model.name: {cfg.model.name!r}, but rl.policy {self.rl.policy} is a "
                              f"{self.policy.config.name!r} model")
        cfg.model = self.policy.config  # the checkpoint decides the shape; saved with every checkpoint
        cfg.model.init_from = None
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
            if self.tokenizer is not None:  # a recommender policy has item ids, not text
                self.tokenizer.save(self.run_dir / "tokenizer")
        self.ranks.barrier()
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim,
                                                         self.total_steps * self.updates_per_step)
        self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint.keep_last)
        self.step = 0
        self.setup()
        self.step = self.resume()
        self.metrics = MetricsLogger(self.run_dir, cfg, self.ranks.is_main, self.step)
        self.guard = faults.StepGuard(self, self.total_steps)  # SIGUSR1/SIGTERM: checkpoint, then exit

    # ---------------------------------------------------------------- hooks for trainers
    @property
    def total_steps(self) -> int:
        return self.rl.steps

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates in one train_step (the LR schedule counts updates)."""
        return 1

    @classmethod
    def validate_config(cls, rl_cfg) -> None:
        """A trainer's own config checks (called when a recipe is loaded)."""

    def setup(self) -> None:
        """Build what the trainer needs (engine, prompts, reference) before resume."""

    def train_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def should_evaluate(self, step: int) -> bool:
        """Evaluate after this step (`step` counts finished steps; 0 is the starting policy)."""
        every = getattr(self.rl, "eval_every", 0)
        return step == 0 or step == self.total_steps or bool(every and step % every == 0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def next_steps(self, run_dir: str) -> str:
        """What a user runs next on the finished run (printed by `keel rl`)."""
        return f'keel generate {run_dir} --prompt "..."   |   keel export hf {run_dir} OUT_DIR'

    def after_resume(self) -> None:
        """Called once the policy holds its resumed weights (e.g. sync them to a rollout engine)."""

    # ---------------------------------------------------------------- shared pieces
    def prompt_seed(self, position: int, stream: int = 0) -> int:
        """The seed of the samples of the prompt at `position` of prompt stream `stream` (a trainer's
        training streams, its held-out set): a function of train.seed and the prompt alone."""
        return ((self.cfg.train.seed * 1_000_003 + position) * 97 + 13) * 31 + stream

    def generate_shares(self, prompt_ids: list, params, first_position: int, stream: int = 0, score=None):
        """(rollouts, scores, the slowest rank's generation seconds) of every prompt, on every rank:
        each rank generates its share, each prompt seeded by its position (keel/rl/sharding.py);
        `score(rollouts)` (prompt_index global) runs on the rank that generated them; then the shares
        are gathered in prompt order."""
        share = self.ranks.share(len(prompt_ids))
        params.prompt_seeds = tuple(self.prompt_seed(first_position + i, stream) for i in share)
        mine, seconds = [], 0.0
        if len(share):
            t0 = time.perf_counter()
            mine = self.engine.generate([prompt_ids[i] for i in share], params)
            seconds = time.perf_counter() - t0
        for ro in mine:
            ro.prompt_index += share.start
        scores = score(mine) if score is not None else [None] * len(mine)
        # Over the rollout group: rollouts may be generated in a background thread while the main thread
        # runs FSDP's collectives (rl.one_step_off_policy, keel/rl/rollout_ahead.py).
        group = self.ranks.rollout_group
        gathered = self.ranks.gather(list(zip(mine, scores)), group)
        return [g[0] for g in gathered], [g[1] for g in gathered], self.ranks.all_max([seconds], group)[0]

    def load_model(self, spec: str, trainable: bool = True):
        """(model, tokenizer) of a policy-like spec: whole on one process, FSDP-sharded over ranks."""
        if self.ranks.sharded:
            return build_sharded_policy(spec, self.cfg, self.ranks, trainable)
        model, tokenizer = load_policy(spec, self.device)
        return (model if trainable else model.eval().requires_grad_(False)), tokenizer

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision.dtype == "bf16")

    def optimizer_step(self) -> dict:
        """Clip, step, advance the LR schedule, clear grads. Skips a non-finite update."""
        # Fault injection (tests): KEEL_FAULT_KILL_AT_STEP=N SIGKILLs the process here, midway
        # through step N (its gradients computed, its update not applied), as keel/train does.
        faults.inject_kill(self.step + 1, self.ranks.dist.rank)
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = float(clip_grad_norm(self.policy.parameters(), max_norm))
        lr = self.scheduler.get_last_lr()[0]
        finite = torch.isfinite(torch.tensor(grad_norm)).item()
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "lr": lr, "update_skipped": not finite}

    def save(self) -> Path:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "world_size": self.ranks.dist.world_size,
                 "rl": to_jsonable(self.state_dict())}
        return self.ckpt.save(self.step, self.policy, self.optimizer, state,
                              (self.run_dir / "config.yaml").read_text())

    def resume(self) -> int:
        mode = self.cfg.checkpoint.resume
        path: Optional[Path] = None
        if mode == "auto":
            path = self.ckpt.latest()
        elif mode != "never":
            path = resolve_checkpoint(mode)
        if path is None:
            self.after_resume()
            return 0
        state = Checkpointer.load(path, self.policy, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_state_dict(from_jsonable(state.get("rl", {})))
        self.step = state["step"]
        if self.ranks.is_main:
            print(f"keel rl: resumed from {path} (step {state['step']}, saved on {state.get('world_size', 1)} "
                  f"rank(s))", flush=True)
        self.after_resume()
        return state["step"]

    def train(self) -> dict:
        cfg = self.cfg
        progress = ProgressLine(self.total_steps, self.step, cfg.logging.progress and self.ranks.is_main)
        summary: dict = {}
        if self.step == 0 and self.should_evaluate(0):
            baseline = self.evaluate()  # the starting policy, as step 0
            if baseline:
                self.metrics.log(0, baseline)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            row = self.train_step()
            self.step += 1
            row["step_time_s"] = time.perf_counter() - t0
            if self.should_evaluate(self.step):
                row.update(self.evaluate())
            self.metrics.log(self.step, row)
            progress.update(self.step, row.get("loss", float("nan")), row.get("lr", 0.0),
                            row.get("train_tokens_per_s", 0.0))
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
            summary = row
            if self.guard.preempted():  # SIGUSR1/SIGTERM on any rank: stop here, on a checkpoint
                break
        progress.close()
        summary["checkpoint"] = str(self.ckpt.final(self.step, self.save))  # always end on a checkpoint
        summary["wandb_dir"] = self.metrics.wandb_dir
        self.metrics.close()
        return self.guard.finish(summary)  # a preempted run: summary["preempted"], requeue marker
