"""Long-context questions with checkable answers, built from the real KJV and Shakespeare texts.

An item's prompt is a few documents (a contiguous window of each: KJV books, Shakespeare plays),
every line labelled `[Doc N]` with its line number in the document, then one question:
  retrieval     What is the text of line [Gen 1203]?             -> rouge_l against the line
  quote_source  Which document contains "..."?                    -> em against the document name
  counting      How many times does the word W appear in doc k?   -> em against the count
  ordering      Give labels of these lines in context order.      -> pairwise_accuracy
Items are deterministic in (seed, index), and the context is sized to `context_tokens`, measured
with a tokenizer when one is given and estimated with `chars_per_token` otherwise.
"""
from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from keel.data.assets import corpus_files
from keel.errors import ConfigError
from keel.rl.prompts import PromptItem, register_prompt_source

TASKS = {"retrieval": "rouge_l", "quote_source": "em", "counting": "em", "ordering": "pairwise_accuracy"}
CORPORA = {"kjv": ("kjv",), "shakespeare": ("shakespeare",), "both": ("kjv", "shakespeare")}
QUOTE_WORDS = 6
MIN_LINE_WORDS = 5
# A word is a maximal run of letters: "LORD's" holds the word "lord", "'tis" the word "tis".
_WORD = re.compile(r"[A-Za-z]+")


@dataclass
class LongContextConfig:
    corpus: str = "kjv"  # kjv | shakespeare | both
    tasks: tuple = tuple(TASKS)
    n: int = 64
    seed: int = 0
    context_tokens: int = 2048
    chars_per_token: float = 4.0  # used only when no tokenizer is given
    n_docs: int = 3
    order_k: int = 2  # lines to put in order (2: "which comes first")
    think_gate: bool = False

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        if self.corpus not in CORPORA:
            raise ConfigError(f"rl.prompts.corpus: unknown corpus {self.corpus!r}; expected one of {sorted(CORPORA)}")
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"rl.prompts.tasks: unknown long-context task {task!r}; expected some of {sorted(TASKS)}")
        checks = {"n": self.n >= 1, "context_tokens": self.context_tokens >= 64, "n_docs": self.n_docs >= 1,
                  "order_k": 2 <= self.order_k <= 26, "chars_per_token": self.chars_per_token > 0,
                  "tasks": len(self.tasks) >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"rl.prompts.{key}: invalid value {getattr(self, key)!r}")


@dataclass
class Document:
    name: str
    lines: tuple  # non-empty lines; line i (0-based) is labelled i + 1


@dataclass
class Window:
    doc: Document
    start: int
    stop: int = field(default=0)

    def labelled(self) -> list[str]:
        return [f"[{self.doc.name} {i + 1}] {self.doc.lines[i]}" for i in range(self.start, self.stop)]

    def text(self) -> str:
        return "\n".join(self.doc.lines[self.start:self.stop])


def _doc_name(stem: str, corpus: str) -> str:
    if corpus == "kjv":  # "00_Gen" -> "Gen"
        return stem.split("_", 1)[1]
    return string.capwords(stem.removesuffix("_gut").replace("_", " ")).replace(" ", "")


@functools.lru_cache(maxsize=4)
def load_documents(corpus: str) -> tuple:
    docs = []
    for name in CORPORA[corpus]:
        for path in corpus_files(name):
            lines = tuple(" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines())
            docs.append(Document(_doc_name(path.stem, name), tuple(line for line in lines if line)))
    return tuple(docs)


def count_word(text: str, word: str) -> int:
    return sum(1 for w in _WORD.findall(text) if w.lower() == word)


def _fill(rng: random.Random, docs: list[Document], char_budget: int) -> list[Window]:
    per_doc = max(200, char_budget // len(docs))
    windows = []
    for doc in docs:
        total = sum(len(line) + 12 for line in doc.lines)  # 12 ~ the "[Doc N] " label
        if total <= per_doc:
            windows.append(Window(doc, 0, len(doc.lines)))
            continue
        # A start that leaves enough text after it to fill the budget.
        start, tail = len(doc.lines), 0
        while start > 0 and tail < per_doc:
            start -= 1
            tail += len(doc.lines[start]) + 12
        window = Window(doc, rng.randrange(0, start + 1))
        used, window.stop = 0, window.start
        while window.stop < len(doc.lines) and used + len(doc.lines[window.stop]) + 12 <= per_doc:
            used += len(doc.lines[window.stop]) + 12
            window.stop += 1
        window.stop = max(window.stop, window.start + 1)
        windows.append(window)
    return windows


def _context(windows: list[Window]) -> str:
    blocks = [f"Document {k}: {w.doc.name}\n" + "\n".join(w.labelled()) for k, w in enumerate(windows, 1)]
    return "\n\n".join(blocks)


def _candidate_lines(windows: list[Window]) -> list[tuple[int, int]]:
    """(window index, line index) of lines long enough to ask about, whose text is unique in the context."""
    texts = Counter(w.doc.lines[i] for w in windows for i in range(w.start, w.stop))
    return [(k, i) for k, w in enumerate(windows) for i in range(w.start, w.stop)
            if len(w.doc.lines[i].split()) >= MIN_LINE_WORDS and texts[w.doc.lines[i]] == 1]


def _ask_retrieval(rng, windows, cfg):
    k, i = rng.choice(_candidate_lines(windows))
    label = f"[{windows[k].doc.name} {i + 1}]"
    question = f"What is the exact text of line {label}?"
    return question, windows[k].doc.lines[i], {"label": label}


def _ask_quote_source(rng, windows, cfg):
    others = lambda k: " ".join(windows[j].text().lower() for j in range(len(windows)) if j != k)  # noqa: E731
    for _ in range(50):
        k, i = rng.choice(_candidate_lines(windows))
        words = windows[k].doc.lines[i].split()
        if len(words) < QUOTE_WORDS:
            continue
        s = rng.randrange(0, len(words) - QUOTE_WORDS + 1)
        quote = " ".join(words[s:s + QUOTE_WORDS])
        if quote.lower() not in others(k):
            question = f'Which document contains the quote "{quote}"? Answer with the document\'s name only.'
            return question, windows[k].doc.name, {"quote": quote}
    return None


def _ask_counting(rng, windows, cfg):
    k = rng.randrange(len(windows))
    counts = Counter(w.lower() for w in _WORD.findall(windows[k].text()))
    candidates = sorted(w for w, c in counts.items() if 2 <= c <= 30 and len(w) >= 3) or sorted(counts)
    word = rng.choice(candidates)
    question = (f'How many times does the word "{word}" appear in Document {k + 1} ({windows[k].doc.name})? '
                "Count whole words, ignoring case and the line labels. Answer with a number only.")
    return question, str(counts[word]), {"word": word, "document": k + 1}


def _ask_ordering(rng, windows, cfg):
    candidates = _candidate_lines(windows)
    if len(candidates) < cfg.order_k:
        return None
    chosen = rng.sample(candidates, cfg.order_k)  # shuffled; labels follow this order
    labels = string.ascii_uppercase[:cfg.order_k]
    shown = "\n".join(f"{label}: {windows[k].doc.lines[i]}" for label, (k, i) in zip(labels, chosen))
    in_context = sorted(zip(chosen, labels))  # windows appear in order, lines in order within each
    question = (f"The following lines all appear in the documents above:\n{shown}\n"
                "List their labels in the order the lines appear in the context, one label per line.")
    return question, [label for _, label in in_context], {"lines": {lb: windows[k].doc.lines[i] for lb, (k, i) in zip(labels, chosen)}}


ASKERS = {"retrieval": _ask_retrieval, "quote_source": _ask_quote_source,
          "counting": _ask_counting, "ordering": _ask_ordering}


def _prompt(context: str, question: str, think_gate: bool) -> str:
    think = "First think inside <think> </think>, then answer. " if think_gate else ""
    return (f"Read the documents below and answer the question.\n\n{context}\n\nQuestion: {question}\n"
            f"{think}End your response with a line \"Answer:\" followed by the answer.")


def build_item(cfg: LongContextConfig, index: int, tokenizer=None) -> PromptItem:
    docs = load_documents(cfg.corpus)
    task = cfg.tasks[index % len(cfg.tasks)]
    count_tokens = (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else None
    char_budget = int(cfg.context_tokens * cfg.chars_per_token)
    for attempt in range(20):
        rng = random.Random(f"{cfg.seed}:{index}:{attempt}")
        chosen = rng.sample(docs, min(cfg.n_docs, len(docs)))
        for _ in range(6):  # shrink toward the token target; the estimate only sets the start
            windows = _fill(random.Random(f"{cfg.seed}:{index}:{attempt}:windows"), chosen, char_budget)
            asked = ASKERS[task](random.Random(f"{cfg.seed}:{index}:{attempt}:{task}"), windows, cfg)
            if asked is None:
                break
            prompt = _prompt(_context(windows), asked[0], cfg.think_gate)
            n_tokens = count_tokens(prompt) if count_tokens else round(len(prompt) / cfg.chars_per_token)
            if n_tokens <= cfg.context_tokens:
                question, answer, extra = asked
                meta = {"think_gate": cfg.think_gate, "documents": [w.doc.name for w in windows],
                        "windows": [(w.doc.name, w.start + 1, w.stop) for w in windows],
                        "prompt_tokens": n_tokens, "question": question, "index": index, **extra}
                return PromptItem(prompt=prompt, task=f"long_{task}", answer=answer, reward=TASKS[task],
                                  source=f"long_context/{cfg.corpus}", meta=meta)
            char_budget = int(char_budget * cfg.context_tokens / n_tokens * 0.97)
    raise ConfigError(f"rl.prompts.context_tokens: could not build a {task!r} question within "
                      f"{cfg.context_tokens} tokens; raise context_tokens or lower n_docs")


def build_long_context_items(cfg: LongContextConfig, tokenizer: Optional[object] = None) -> list[PromptItem]:
    return [build_item(cfg, i, tokenizer) for i in range(cfg.n)]


# --------------------------------------------------------------------------------------- long_context

@register_prompt_source("long_context", corpus="kjv", tasks=("retrieval", "quote_source", "counting", "ordering"),
                        n=64, seed=0, context_tokens=2048, chars_per_token=4.0, tokenizer=None,
                        n_docs=3, order_k=2, think_gate=False)
def load_long_context(opts: dict) -> list[PromptItem]:
    tokenizer = opts.pop("tokenizer")
    if tokenizer is not None and isinstance(tokenizer, str):
        from transformers import AutoTokenizer  # heavy: only for a tokenizer named by path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return build_long_context_items(LongContextConfig(**opts), tokenizer=tokenizer)
