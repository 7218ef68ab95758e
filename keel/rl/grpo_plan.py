"""`keel plan` of a GRPO recipe (keel/rl/plan.py): one micro-batch of the policy's update traced.

A GRPO step scores rl.prompts_per_step x rl.group_size sequences with gradient, rl.micro_batch at a
time, each planned at its longest: rl.max_prompt_tokens of prompt plus sampling.max_tokens of
response. The response tokens go through the LM head in chunks (keel/rl/scoring.py), so the logits
held at once are a chunk's, not [tokens x vocab]. The policy's shape is read from rl.policy (a keel
run or an HF folder on this machine), not from the recipe's model: section.

Counted beside the traced step (analytic): the native engine's own copy of the weights (every rank
holds all of it, in rl.engine_dtype, refreshed after each update) and the frozen reference under
rl.kl_coef > 0 (sharded like the policy, fp32, no gradients or optimizer state). Not counted: the
rollout phase itself (the engine's KV cache lives while the policy's activations do not; a long
prompt's cache can exceed them), vLLM (with `sleep: true` it frees its weights and KV cache during
the update, keeping its CUDA context), and rl.micro_batch_tokens packing (a packed row of that many
tokens holds what the same tokens padded into rows do, less the padding).
"""
from __future__ import annotations

import torch

from keel.errors import ConfigError, KeelError
from keel.rl.plan import register_step_plan
from keel.rl.scoring import SCORE_CHUNK, token_scores
from keel.rl.sharding import policy_source


@register_step_plan("grpo")
class GRPOStepPlan:
    chunk = SCORE_CHUNK  # response tokens whose logits exist at once, as the trainer scores them

    def __init__(self, cfg):
        try:
            cfg.model = policy_source(cfg.rl.policy, with_tokenizer=False)[0]
        except KeelError as e:
            message = str(e).removeprefix("rl.policy: ")
            raise ConfigError(f"rl.policy: keel plan reads the policy's shape from it: {message}") from None
        # The plan's "loss chunk" row: the scorer's chunk of the response tokens a micro-batch scores
        cfg.model.loss_chunk, cfg.data.seq_len = SCORE_CHUNK, cfg.rl.sampling.max_tokens
        self.prompt, self.response = cfg.rl.max_prompt_tokens, cfg.rl.sampling.max_tokens
        self.temperature, self.entropy = cfg.rl.sampling.temperature, cfg.rl.entropy_coef > 0

    @staticmethod
    def rows_per_step(rl) -> int:
        return rl.prompts_per_step * rl.group_size

    def fake_batch(self, rows: int, cp: int = 1) -> dict:
        return {"ids": torch.zeros(rows, self.prompt + self.response, dtype=torch.long)}

    def loss_sum(self, model, batch: dict):
        """What _micro_loss differentiates: the response tokens' log-probs (and entropies), scored in
        chunks. The response is taken as a slice, not through a boolean mask, so the trace has static
        shapes; the tokens scored are the same."""
        ids = batch["ids"]
        # The trainer registers hidden_states as an FSDP forward method; here it runs through
        # __call__ instead, so that FSDP's forward hooks run (the same gathers) and the memory
        # tracker, which instruments only those hooks, sees the root module.
        model.forward = model.hidden_states
        try:
            hidden = model(ids)[:, self.prompt - 1:-1]
        finally:
            del model.forward
        picked, entropy = token_scores(hidden.reshape(-1, hidden.shape[-1]), model.head_weight(),
                                       ids[:, self.prompt:].reshape(-1), self.temperature, self.entropy, self.chunk)
        return picked.sum() + entropy.sum()

    def resident_memory(self, cfg, policy_share: int) -> list:
        """Analytic rows beside the traced step; `policy_share`: this rank's traced bytes of the policy."""
        n_params, rows = cfg.model.num_params(), []
        if cfg.rl.engine == "native":
            width = 4 if cfg.rl.engine_dtype == "float32" else 2
            rows.append(("rollout engine weights", n_params * width,
                         f"analytic: the native engine's whole copy in {cfg.rl.engine_dtype}"))
        if cfg.rl.kl_coef > 0:
            rows.append(("reference weights", policy_share,
                         "the frozen reference, sharded like the policy: its traced share again"))
        return rows

    def plan_notes(self, cfg, rank, capacity) -> list:
        """The rollout phase, beside the traced update: the native engine's KV cache, preallocated for
        rl.engine_batch sequences of the longest length, next to its weights and the training state
        that stays resident (weights, optimizer state; gradients are freed)."""
        if cfg.rl.engine != "native":
            return []
        m, width = cfg.model, 4 if cfg.rl.engine_dtype == "float32" else 2
        kv = cfg.rl.engine_batch * (self.prompt + self.response) * m.n_layers * 2 * m.n_kv_heads * m.head_dim * width
        held = sum(row.bytes for row in rank.rows if row.name in ("parameters", "optimizer state", "rollout engine weights"))
        gib = 1 << 30
        note = (f"rollouts (not in the total): the native engine's KV cache for rl.engine_batch={cfg.rl.engine_batch} "
                f"sequences of {self.prompt + self.response} tokens is {kv / gib:.1f} GiB, "
                f"{(kv + held) / gib:.1f} GiB with what stays resident")
        if capacity and kv + held > capacity:
            note = f"warning: {note}, more than the GPU's {capacity / gib:.0f} GiB: lower rl.engine_batch"
        return [note]

    def sample_shape(self) -> str:
        return f"({self.prompt} prompt + {self.response} response tokens, scored in chunks)"
