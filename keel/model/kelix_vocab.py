"""Kelix's text side on Fashion-MNIST: special ids and a word-level caption vocabulary.

A block's unused sub-positions are PAD and every block ends with Q_EOS (keel/model/kelix.py); the
words are every word of every caption template (keel/data/fashion_mnist.py), lower case, sorted, so
the vocabulary is a pure function of the templates (and is also saved beside each run's checkpoints).
"""
from __future__ import annotations

from keel.data.fashion_mnist import CLASS_NAMES, captions_for
from keel.errors import ConfigError

PAD, BOS, EOS, BOI, EOI, Q_EOS = range(6)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<q_eos>")


class CaptionVocab:
    def __init__(self, words: list[str]):
        self.words = list(SPECIAL_TOKENS) + sorted(set(words) - set(SPECIAL_TOKENS))
        self.ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_templates(cls) -> "CaptionVocab":
        return cls([w for c in range(len(CLASS_NAMES)) for t in captions_for(c) for w in t.lower().split()])

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.lower().split() if w not in self.ids]
        if unknown:
            raise ConfigError(f"--prompt: unknown word(s) {unknown}; the captions use "
                              f"{self.words[len(SPECIAL_TOKENS):]}")
        return [self.ids[w] for w in text.lower().split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if i >= len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.words)
