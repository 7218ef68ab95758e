"""Training engines by name (`parallel.engine`): keel's own loop on torch.distributed, or DeepSpeed
ZeRO (whose package is imported only when that engine starts)."""
from __future__ import annotations

from keel.config import Config
from keel.train.deepspeed import DeepSpeedTrainer
from keel.train.trainer import Trainer

TRAINING_ENGINES = {"torch": Trainer, "deepspeed": DeepSpeedTrainer}


def build_trainer(cfg: Config) -> Trainer:
    return TRAINING_ENGINES[cfg.parallel.engine](cfg)
