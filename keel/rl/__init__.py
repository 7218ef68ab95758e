"""RL post-training: rollout engines, rewards, advantage estimators, policy losses, prompt sources and
trainers (GRPO, DPO, on-policy distillation), every one looked up by name from a registry. Importing
keel.rl registers the built-in trainers and prompt sources."""
from keel.rl import dpo, grpo, grpo_plan, long_context, opd, rec_objectives, rec_rl  # noqa: F401  (registration on import)
