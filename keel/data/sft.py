"""Supervised fine-tuning samples: one conversation per sample, loss only on the answers.

Each jsonl line is either {"prompt": ..., "response": ...} (tokenized as prompt + response + EOS,
no template added: the prompt carries whatever formatting the user wants) or
{"messages": [{"role": ..., "content": ...}, ...]} rendered with the tokenizer's chat template,
where every assistant turn is trained on. A sample has the same keys as a PackedDataset sample:
labels are -100 on prompt tokens and padding; padding has doc id -1 so document-masked attention
keeps it apart from the example, which is document 0 with positions counting from 0.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from keel.data.jsonl import jsonl_records
from keel.data.tokenizer import Tokenizer
from keel.errors import DataError

IGNORE = -100  # the label torch's cross-entropy skips
PAD_DOC = -1


def _messages_tokens(messages, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it is an assistant token."""
    if not tokenizer.chat_template:
        raise DataError(f"{where}: 'messages' needs a tokenizer with a chat template "
                        f"({tokenizer.name} has none); use 'prompt'/'response' instead")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        f"{{\"role\": str, \"content\": str}} objects")
    render = tokenizer.hf.apply_chat_template
    text = render(messages, tokenize=False)
    # Assistant spans in characters: what rendering turn k adds after the generation prompt.
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        upto = render(messages[:k + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(f"{where}: the chat template of {tokenizer.name} does not render "
                            f"conversations turn by turn; use 'prompt'/'response' instead")
        spans.append((len(before), len(upto)))
    if not spans:
        raise DataError(f"{where}: 'messages' has no assistant turn to train on")
    enc = tokenizer.hf.backend_tokenizer.encode(text, add_special_tokens=False)
    trained = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc.offsets]
    return enc.ids, trained


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer: Tokenizer, seq_len: int):
        self.path = Path(path)
        self.seq_len = int(seq_len)
        self.pad_id = tokenizer.pad_id
        pairs, chats = [], []  # (slot, prompt, response) and (slot, messages, where)
        n = 0
        for where, record in jsonl_records(self.path, "SFT data file",
                                           " (expected a .jsonl file of prompt/response or messages records)"):
            if "messages" in record:
                chats.append((n, record["messages"], where))
            elif "prompt" in record and "response" in record:
                if not (isinstance(record["prompt"], str) and isinstance(record["response"], str)):
                    raise DataError(f"{where}: 'prompt' and 'response' must be strings")
                pairs.append((n, record["prompt"], record["response"]))
            else:
                raise DataError(f"{where}: expected fields 'prompt' and 'response', or 'messages'")
            n += 1
        if n == 0:
            raise DataError(f"{self.path}: no SFT examples found")
        # Each example as (token ids, per-token "is a trained target" flags); tokens beyond
        # seq_len + 1 can never be seen, so drop them now.
        self.examples: list[tuple[np.ndarray, np.ndarray]] = [None] * n  # type: ignore[list-item]
        if pairs:
            prompts = tokenizer.encode_batch([p for _, p, _ in pairs])
            responses = tokenizer.encode_batch([r for _, _, r in pairs])
            for (slot, _, _), p, r in zip(pairs, prompts, responses):
                ids = p + r + [tokenizer.eos_id]
                self._store(slot, ids, [False] * len(p) + [True] * (len(r) + 1))
        for slot, messages, where in chats:
            self._store(slot, *_messages_tokens(messages, tokenizer, where))
        silent = sum(1 for ids, trained in self.examples if not trained[1:].any())
        if silent:
            warnings.warn(f"{self.path}: {silent} of {n} examples have no response tokens within "
                          f"seq_len {self.seq_len} and add nothing to the loss", stacklevel=2)

    def _store(self, slot: int, ids: list[int], trained: list[bool]) -> None:
        keep = self.seq_len + 1
        self.examples[slot] = (np.asarray(ids[:keep], dtype=np.int64), np.asarray(trained[:keep], dtype=bool))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, trained = self.examples[i]
        n = len(ids) - 1  # tokens that have a next token to predict
        L = self.seq_len
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE, dtype=np.int64)
        doc_ids = np.full(L, PAD_DOC, dtype=np.int64)
        input_ids[:n] = ids[:-1]
        labels[:n] = np.where(trained[1:], ids[1:], IGNORE)  # label t is token t+1
        doc_ids[:n] = 0
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "positions": torch.arange(L, dtype=torch.int64),
            "doc_ids": torch.from_numpy(doc_ids),
        }

    def __repr__(self) -> str:
        return f"SFTDataset({self.path}, seq_len={self.seq_len}, examples={len(self)})"
