"""Fashion-MNIST (Xiao et al. 2017) from Debian's `dataset-fashion-mnist`, plus class captions.

The Debian package installs the four original gzipped IDX files under /usr/share/datasets/fashion-mnist
(`$KEEL_FASHION_MNIST` points elsewhere). IDX is big-endian: a 4-byte magic (0x0000 08 <ndim>, 08 =
unsigned byte), one int32 per dimension, then the raw bytes. The reader checks the magic, the number
of dimensions and that the payload is exactly the size the header announces, so a truncated or foreign
file fails with a DataError naming it instead of reshaping garbage.

Captions: a few English templates per class ("a photo of an ankle boot"), the text side of the
Kelix text<->image examples; `class_from_prompt` reads a generation prompt "a <class>" back to a label.
"""
from __future__ import annotations

import functools
import gzip
import os
import re
from pathlib import Path

import numpy as np
import torch

from keel.errors import ConfigError, DataError, MissingAssetError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}  # keel's split name -> the files' prefix
IMAGE_SIZE = 28
_IMAGE_MAGIC, _LABEL_MAGIC = 0x803, 0x801  # ubyte with 3 dims / 1 dim

# Templates take the article too: "an ankle boot", "a sneaker".
_TEMPLATES = ("{a} {name}", "a photo of {a} {name}", "a picture of {a} {name}", "this is {a} {name}",
              "an image of {a} {name}", "a grayscale photo of {a} {name}")
# Other spellings a prompt may use; each names one class only ("boot" alone is not enough: ankle boot
# vs. the sneaker/sandal footwear is the point of the class, so it stays unambiguous).
_ALIASES = {"t-shirt": 0, "tshirt": 0, "t shirt": 0, "top": 0, "t-shirt / top": 0}


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("KEEL_FASHION_MNIST") or DEFAULT_DIR)


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """One gzipped IDX file as uint8 [N, *item_shape]; checks magic, dims and payload size."""
    if not path.is_file():
        raise MissingAssetError(f"Fashion-MNIST file {path} is missing; install Debian's "
                                f"dataset-fashion-mnist (scripts/setup.sh does) or set KEEL_FASHION_MNIST")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip (BadGzipFile is an OSError) or cut short (EOFError)
        raise DataError(f"{path}: not a readable gzip file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"expected a gzipped IDX file") from None
    ndim = len(item_shape) + 1
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        got = hex(int.from_bytes(raw[:4], "big")) if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(f"{path}: IDX magic {got}, expected {hex(magic)} (uint8, {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    payload = len(raw) - 4 - 4 * ndim
    if dims[1:] != item_shape or payload != int(np.prod(dims)):
        expected = "[N" + "".join(f", {d}" for d in item_shape) + "]"
        raise DataError(f"{path}: header dims {list(dims)} with {payload} payload bytes; "
                        f"expected dims {expected} and exactly prod(dims) payload bytes")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=None)
def _load(directory: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Keyed by the folder too, so pointing KEEL_FASHION_MNIST elsewhere never returns stale arrays.
    prefix = SPLITS[split]
    images_path = Path(directory) / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = Path(directory) / f"{prefix}-labels-idx1-ubyte.gz"
    images = _read_idx(images_path, _IMAGE_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
    labels = _read_idx(labels_path, _LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{labels_path}: label {int(labels.max())}, expected 0..{len(CLASS_NAMES) - 1}")
    # np.frombuffer views are read-only; copy once into torch-owned memory.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split "train" (60000) or "test" (10000).

    Decoded once per process and folder: the same tensors come back on every call, so clone before
    modifying them in place. `load_fashion_mnist.cache_clear()` drops the cache."""
    if split not in SPLITS:
        raise ConfigError(f"data.split: {split!r} is not a Fashion-MNIST split; expected one of {sorted(SPLITS)}")
    return _load(str(fashion_mnist_dir()), split)


load_fashion_mnist.cache_clear = _load.cache_clear  # type: ignore[attr-defined]


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def caption_templates() -> tuple[str, ...]:
    """Caption templates with `{a}` (the article) and `{name}` (the class name) slots."""
    return _TEMPLATES


def captions_for(label: int) -> list[str]:
    """Every template filled in for class `label`: "a sneaker", "a photo of an ankle boot", ..."""
    if not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label {label} outside 0..{len(CLASS_NAMES) - 1}")
    name = CLASS_NAMES[int(label)]
    return [t.format(a=_article(name), name=name) for t in _TEMPLATES]


_LOOKUP = {**{name: i for i, name in enumerate(CLASS_NAMES)}, **_ALIASES}


def class_from_prompt(text: str) -> int:
    """The label of a prompt "a <class>" / "an <class>" (any case, extra spaces and a final "." ok).
    Either article is accepted with any class: the class name, not its grammar, is what matters."""
    words = re.sub(r"\s+", " ", str(text).strip().lower()).rstrip(".").strip()
    article, _, name = words.partition(" ")
    if article in ("a", "an") and name in _LOOKUP:
        return _LOOKUP[name]
    raise ConfigError(f"--prompt: {str(text)!r} is not a Fashion-MNIST class prompt; expected 'a <class>' "
                      f"with <class> one of {', '.join(CLASS_NAMES)} (or t-shirt, tshirt, top)")
