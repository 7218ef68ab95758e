"""RL post-training: rollout engines, rewards, advantage estimators, policy losses, prompt sources and
trainers (GRPO, DPO, on-policy distillation), every one looked up by name from a registry. Importing
keel.rl registers the built-in trainers and prompt sources."""
from keel.rl import distill, dpo, grpo, long_context, rec_objectives  # noqa: F401  (registration on import)
