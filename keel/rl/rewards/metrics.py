"""GoLongRL's long-context metrics, as its verl fork scores LongBench-Pro-style tasks.

Reference: `verl/utils/reward_score/long_bench_pro.py` in GoLongRL's verl fork (docs/grpo.md#rewards).
The answer area is the text after the last `[Answer]` (or `Answer:`) marker; gold answers and predicted
lines are lower-cased with runs of whitespace collapsed; list-valued predictions are one item per line.
Every metric is in [0, 1].

Deliberate differences from the reference, each to stop a reward from depending on layout noise:
empty predicted lines are dropped, a repeated predicted item keeps its first position, and EM
ignores one trailing full stop.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

from keel.rl.rewards.format import answer_area


def normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def prediction_lines(prediction: str) -> list[str]:
    """Normalised, non-empty, de-duplicated lines of the answer area, in order."""
    seen, lines = set(), []
    for line in answer_area(prediction).lower().split("\n"):
        line = " ".join(line.split())
        if line and line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def exact_match(answers: Sequence[str], prediction: str) -> float:
    """1 if the whole answer area equals one of the gold answers."""
    pred = normalize(answer_area(prediction))
    pred = pred[:-1].rstrip() if pred.endswith(".") else pred
    return float(any(pred == normalize(a) for a in answers))


def accuracy(answers: Sequence[str], prediction: str) -> float:
    """Multiple choice / single fact: the first predicted line equals the first gold answer."""
    lines = prediction_lines(prediction)
    return float(bool(answers) and bool(lines) and lines[0] == normalize(answers[0]))


def sub_exact_match(answers: Sequence[str], prediction: str) -> float:
    """Fraction of gold answers that appear as a predicted line."""
    lines = set(prediction_lines(prediction))
    if not answers or not lines:
        return 0.0
    return sum(normalize(a) in lines for a in answers) / len(answers)


def set_f1(answers: Sequence[str], prediction: str) -> float:
    """F1 between the set of gold answers and the set of predicted lines."""
    gold, pred = {normalize(a) for a in answers}, set(prediction_lines(prediction))
    common = len(gold & pred)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(answers: Sequence[str], prediction: str) -> float:
    """Max over gold answers of the ROUGE-L F1 (longest common token subsequence) with the answer area.

    The reference calls the `rouge` package on whitespace tokens; on single passages that is this
    LCS F-measure (it uses beta = P/R; we use the standard F1, beta = 1).
    """
    pred = normalize(answer_area(prediction)).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        lcs = _lcs_length(gold, pred)
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def ndcg(answers: Sequence[str], prediction: str) -> float:
    """NDCG@k, k = number of gold items, as trec_eval's `ndcg_cut` (linear gains, log2 discount).

    Gold item i (0-based, best first) has relevance k - i; predicted lines are ranked in order.
    """
    gold = [normalize(a) for a in answers]
    pred = prediction_lines(prediction)
    if not gold or not pred:
        return 0.0
    k = len(gold)
    relevance = {g: k - i for i, g in reversed(list(enumerate(gold)))}
    dcg = sum(relevance.get(p, 0) / math.log2(rank + 2) for rank, p in enumerate(pred[:k]))
    ideal = sum((k - i) / math.log2(i + 2) for i in range(k))
    return dcg / ideal


def pairwise_accuracy(answers: Sequence[str], prediction: str) -> float:
    """Gold-ordered pairs that the prediction puts in the same order, over all predicted pairs.

    As in the reference the denominator counts predicted pairs, so extra lines cost reward.
    """
    gold = [normalize(a) for a in answers]
    pred = prediction_lines(prediction)
    if len(gold) <= 1 or len(pred) <= 1:
        return 0.0
    position = {p: i for i, p in enumerate(pred)}
    correct = sum(1 for a, b in combinations(gold, 2)
                  if a in position and b in position and position[a] < position[b])
    return correct / (len(pred) * (len(pred) - 1) // 2)


def iou(answers: Sequence[str], prediction: str) -> float:
    """Jaccard overlap of the gold set and the set of predicted lines (retrieval_calculate's IoU)."""
    gold, pred = {normalize(a) for a in answers}, set(prediction_lines(prediction))
    union = gold | pred
    return len(gold & pred) / len(union) if union else 1.0


METRICS = {
    "em": exact_match, "subem": sub_exact_match, "f1": set_f1, "rouge_l": rouge_l, "ndcg": ndcg,
    "pairwise_accuracy": pairwise_accuracy, "iou": iou, "accuracy": accuracy,
}
