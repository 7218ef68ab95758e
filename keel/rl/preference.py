"""Preference pairs for DPO: read from jsonl, or built from real text, and tokenised into batches.

A pairs file holds one JSON object per line: {"prompt": str, "chosen": str, "rejected": str}, plus
optionally the reference model's summed response log-probabilities `ref_chosen_logp` and
`ref_rejected_logp` (written by the DPO trainer when `rl.dpo.reference: cached`, so the reference
runs once, not every step). A sequence is the prompt's tokens followed by the response's tokens,
and only response tokens are scored.

Two kinds of pairs (TRL's two formats):
- text: strings; the responses continue the prompt's text (no EOS appended unless asked).
- conversational: "prompt" a list of chat messages ({"role", "content"}), "chosen" / "rejected" an
  assistant message list (or a string). The prompt goes through the tokenizer's chat template with
  the assistant header added, and each response ends with EOS, so the policy learns to end its turn.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from keel.data.jsonl import jsonl_records
from keel.errors import DataError


@dataclass
class PreferencePair:
    prompt: Union[str, list]  # text, or chat messages [{"role": ..., "content": ...}]
    chosen: str
    rejected: str
    ref_chosen_logp: Optional[float] = None
    ref_rejected_logp: Optional[float] = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logp is not None and self.ref_rejected_logp is not None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _messages(value, where: str, key: str) -> list:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{\"role\": str, \"content\": str}} "
                        f"messages, got {value!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value, where: str, key: str) -> str:
    """A response as text: a string, or the content of an assistant message list."""
    if isinstance(value, list):
        messages = _messages(value, where, key)
        if any(m["role"] != "assistant" for m in messages):
            raise DataError(f"{where}: field {key!r} must hold assistant messages only")
        value = "".join(m["content"] for m in messages)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string or a list of assistant messages, got {value!r}")
    if not value:
        raise DataError(f"{where}: chosen and rejected must be non-empty")
    return value


def _pair_from_json(obj: dict, where: str) -> PreferencePair:
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        prompt = _messages(prompt, where, "prompt")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of chat messages, got {prompt!r}")
    obj = {**obj, "prompt": prompt, "chosen": _response(obj.get("chosen"), where, "chosen"),
           "rejected": _response(obj.get("rejected"), where, "rejected")}
    refs = {}
    for key in ("ref_chosen_logp", "ref_rejected_logp"):
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"{where}: field {key!r} must be a number, got {value!r}")
        refs[key] = None if value is None else float(value)
    return PreferencePair(obj["prompt"], obj["chosen"], obj["rejected"], **refs)


def load_pairs(path) -> list[PreferencePair]:
    """Every pair of a jsonl file; a malformed line is a DataError naming file:line."""
    path = Path(path)
    pairs = [_pair_from_json(obj, where) for where, obj in
             jsonl_records(path, "preference pairs file", " (expected jsonl with prompt, chosen, rejected)")]
    if not pairs:
        raise DataError(f"{path}: holds no preference pairs")
    return pairs


def save_pairs(pairs: Sequence[PreferencePair], path) -> Path:
    """Write pairs as jsonl (atomically: a crash never leaves half a file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for pair in pairs:
            row = {k: v for k, v in asdict(pair).items() if v is not None}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def _document_words(files: Sequence[Path], min_words: int) -> list[list[str]]:
    docs = [Path(f).read_text(errors="replace").split() for f in files]
    docs = [d for d in docs if len(d) >= min_words]
    if len(docs) < 2:
        raise DataError(f"{len(docs)} document(s) with at least {min_words} words among {len(files)} files; "
                        "pairs need two documents or more")
    return docs


def pairs_from_documents(files: Sequence[Path], n_pairs: int, prompt_words: int = 24, response_words: int = 12,
                         rejected: str = "other_document", seed: int = 0) -> list[PreferencePair]:
    """Pairs from real text: the prompt is a window of a document, `chosen` its true continuation.

    rejected = "other_document": an equally long window from a different document (fluent text that
    does not follow the prompt); "shuffled": the true continuation's words in a shuffled order.
    """
    if rejected not in ("other_document", "shuffled"):
        raise DataError(f"rejected: expected 'other_document' or 'shuffled', got {rejected!r}")
    rng = random.Random(seed)
    need = prompt_words + response_words
    docs = _document_words(files, need)
    pairs = []
    while len(pairs) < n_pairs:
        d = rng.randrange(len(docs))
        start = rng.randrange(len(docs[d]) - need + 1)
        words = docs[d][start:start + need]
        prompt, chosen = words[:prompt_words], words[prompt_words:]
        if rejected == "shuffled":
            bad = list(chosen)
            rng.shuffle(bad)
            if bad == chosen:  # e.g. repeated words: no preference to learn
                continue
        else:
            other = rng.choice([i for i in range(len(docs)) if i != d])
            at = rng.randrange(len(docs[other]) - response_words + 1)
            bad = docs[other][at:at + response_words]
        # The leading space keeps a continuation's first word tokenised as it is mid-sentence.
        pairs.append(PreferencePair(" ".join(prompt), " " + " ".join(chosen), " " + " ".join(bad)))
    return pairs


@dataclass
class PairBatch:
    """2B right-padded sequences: rows [0, B) prompt+chosen, rows [B, 2B) prompt+rejected."""
    input_ids: torch.Tensor  # [2B, L]
    response_mask: torch.Tensor  # [2B, L] bool: True where the token is a response token
    ref_logps: Optional[torch.Tensor]  # [2B] cached reference sums, when every pair has them

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def _prompt_ids(pair: PreferencePair, tokenizer, max_prompt_tokens: int) -> list[int]:
    if pair.conversational:
        if not tokenizer.chat_template:
            raise DataError(f"pair {pair.prompt[0]['content'][:40]!r}: a conversational pair needs a tokenizer "
                            f"with a chat template; {tokenizer.name} has none")
        text = tokenizer.hf.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text)[-max_prompt_tokens:]
    return tokenizer.encode(pair.prompt)[-max_prompt_tokens:] if pair.prompt else []


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_prompt_tokens: int = 1024,
                   max_response_tokens: int = 1024, append_eos: Optional[bool] = None) -> PairBatch:
    """Token ids of every (prompt + chosen) and (prompt + rejected). Prompts keep their last
    `max_prompt_tokens` tokens (the end is what the continuation follows), responses their first.
    append_eos: EOS after each response (counted in max_response_tokens); None: for conversational
    pairs only (a text pair's response is a continuation, not an ending)."""
    pad = tokenizer.pad_id
    rows, masks = [], []
    for field_name in ("chosen", "rejected"):
        for pair in pairs:
            prompt = _prompt_ids(pair, tokenizer, max_prompt_tokens)
            if tokenizer.bos_id is not None and not prompt:
                prompt = [tokenizer.bos_id]  # the first response token needs something to follow
            eos = pair.conversational if append_eos is None else append_eos
            response = tokenizer.encode(getattr(pair, field_name))[:max_response_tokens - int(eos)]
            response += [tokenizer.eos_id] if eos else []
            if not prompt or not response:
                raise DataError(f"pair {str(pair.prompt)[:40]!r}: prompt and {field_name} must both tokenise to "
                                "at least one token")
            rows.append(prompt + response)
            masks.append([False] * len(prompt) + [True] * len(response))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (row, m) in enumerate(zip(rows, masks)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    ref = None
    if pairs and all(p.has_reference for p in pairs):
        ref = torch.tensor([p.ref_chosen_logp for p in pairs] + [p.ref_rejected_logp for p in pairs],
                           dtype=torch.float32)
    return PairBatch(ids, mask, ref)
