"""The `checkpoint:` section of a recipe (registered here, by the layer that writes checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from keel.config import register_section
from keel.errors import ConfigError


@dataclass
class CheckpointConfig:
    every: int = 0  # commit a checkpoint every N steps; 0: only at the end
    keep_last: int = 3  # committed checkpoints kept; older ones are deleted
    # auto: newest complete checkpoint in run.out_dir; never; a step number (e.g. 150); or a path
    resume: Union[str, int] = "auto"

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every: must be >= 0, got {self.every}")
        if self.keep_last <= 0:
            raise ConfigError(f"checkpoint.keep_last: must be > 0, got {self.keep_last}")
        if isinstance(self.resume, int) and self.resume < 0:
            raise ConfigError(f"checkpoint.resume: a step number must be >= 0, got {self.resume}")


register_section("checkpoint", CheckpointConfig)
