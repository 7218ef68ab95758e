"""The `images:` section of a recipe: captioned images for the Kelix family.

Fashion-MNIST (Debian's dataset-fashion-mnist, keel/data/fashion_mnist.py) with captions built from
its class names, in one interleaved stream of two kinds of sample: understanding (image -> caption)
and generation (caption -> image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from keel.config import register_section
from keel.errors import ConfigError


@dataclass
class ImagesConfig:
    dataset: Literal["fashion-mnist"] = "fashion-mnist"  # Debian's dataset-fashion-mnist (the only one yet)
    generation_share: float = 0.5  # share of samples that are caption -> image (the rest image -> caption)
    train_images: int = 0  # the first N training images (0: all 60,000)
    eval_images: int = 1000  # test images evaluated (spread over the 10,000), every eval

    def validate(self) -> None:
        if not 0.0 <= self.generation_share <= 1.0:
            raise ConfigError(f"images.generation_share: must be in [0, 1], got {self.generation_share}")
        if self.train_images < 0:
            raise ConfigError(f"images.train_images: must be >= 0 (0: all), got {self.train_images}")
        if not 0 < self.eval_images <= 10000:
            raise ConfigError(f"images.eval_images: must be in 1..10000 (the test split), got {self.eval_images}")


register_section("images", ImagesConfig, optional=True, provides_data=True)
