"""CLEAR's confidence arithmetic: answer similarity for observed consistency, the BSDetector
combination, and the metric the evaluation harness reports (AUROC)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from augment_ray.curate.text import fold_str
from augment_ray.curate.words import words

# the last number of a text; GSM8K's '#### 42' final answer wins when present
_FINAL_MARK = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
# a minus right after a word ("60-15") is subtraction, not a sign; a comma groups thousands only
# when three digits follow ("3,4" is two numbers)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text: str | None) -> float | None:
    if not text:
        return None
    marked = _FINAL_MARK.findall(text)
    found = marked or _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numbers_match(got: float | None, expected: float) -> bool:
    return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))


def token_f1(a: str, b: str) -> float:
    """F1 of the two texts' word bags (folded as curate.text does; words as curate.words
    splits them, each CJK character a word)."""
    left, right = Counter(words(fold_str(a))), Counter(words(fold_str(b)))
    common = sum((left & right).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(left.values()), common / sum(right.values())
    return 2 * precision * recall / (precision + recall)


def answer_similarity(sample: str, response: str, match: str) -> float | None:
    """How far a sampled answer agrees with the row's response, in [0, 1].
    exact: equal after folding (curate.text: NFKC, case, whitespace); final_number: same final
    number (None when the response has none); token_f1: word-bag F1."""
    if match == "exact":
        return float(fold_str(sample) == fold_str(response))
    if match == "final_number":
        expected = final_number(response)
        if expected is None:
            return None
        return float(numbers_match(final_number(sample), expected))
    if match == "token_f1":
        return token_f1(sample, response)
    raise ValueError(f"unknown match {match!r}")


def rubric_certainty(mean_score: float) -> float:
    """A 1..5 rubric mean on the [0, 1] scale of the other components."""
    return (mean_score - 1.0) / 4.0


def combine(consistency: float | None, certainties: Sequence[float], beta: float) -> float | None:
    """BSDetector: beta * observed consistency + (1 - beta) * self-reflection certainty, where
    the certainty is the mean of the certainty-type components computed (self-reflection,
    P(Yes), rubric). With only one side present, that side alone."""
    certainty = sum(certainties) / len(certainties) if certainties else None
    if consistency is not None and certainty is not None:
        return beta * consistency + (1.0 - beta) * certainty
    return consistency if consistency is not None else certainty


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative (ties count half). None when one class is empty."""
    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # average ranks over ties
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
