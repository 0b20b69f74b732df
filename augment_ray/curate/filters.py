"""Heuristic quality rules for instruction/response rows, vectorized over a batch.

Each rule is a pure function returning a RuleResult: which rows fail, and the detail of a failure
(the measured value against the limit), made only for failing rows. `filter_table` runs the
rules a FilterStepSpec enables, in RULE_ORDER (most specific diagnosis first); the first rule a
row fails is its reject reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.curate.hashing import as_array, ngram_hashes
from augment_ray.curate.text import fold, text_columns
from augment_ray.curate.verdicts import live_positions, reject_at
from augment_ray.curate.words import distinct_per_row, split_words, token_counts
from augment_ray.rows import require_columns

if TYPE_CHECKING:
    from augment_ray.steps.filter import FilterStepSpec

RULE_ORDER = (
    "empty_response",
    "response_equals_instruction",
    "refusal",
    "non_printable",
    "repeated_ngrams",
    "min_chars",
    "max_chars",
    "min_response_chars",
    "max_response_chars",
    "min_tokens",
    "max_tokens",
)
RESPONSE_RULES = frozenset({
    "empty_response", "response_equals_instruction", "refusal", "min_response_chars",
    "max_response_chars",
})

DEFAULT_REFUSAL_PHRASES = (
    "as an ai language model",
    "as a large language model",
    "as an ai assistant, i cannot",
    "i'm sorry, but i cannot",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i cannot fulfill",
    "i can't fulfill",
    "i cannot comply",
    "i can't assist with that",
    "i cannot assist with that",
    "i am unable to",
    "i'm unable to",
    "i'm not able to provide",
)

# control characters other than tab/newline/CR, private-use characters, and U+FFFD (what a
# broken decode leaves behind)
NON_PRINTABLE = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\p{Co}\x{FFFD}]"
APOSTROPHES = r"[\x{2018}\x{2019}\x{02BC}\x{FF07}]"
REPEAT_NGRAM = 3


@dataclass(frozen=True)
class RuleResult:
    failed: np.ndarray  # bool per row
    detail: Callable[[int], str]  # the failure of row i, in words


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _chars(text: pa.Array) -> np.ndarray:
    return _numpy(pc.fill_null(pc.utf8_length(text), 0)).astype(np.int64)


def fold_text(text: pa.Array) -> pa.Array:
    """What the content rules compare: NFKC, lower case, whitespace collapsed; null as empty."""
    return fold(pc.fill_null(text, ""))


def fold_phrase_text(folded: pa.Array) -> pa.Array:
    """Folded text with typographic apostrophes read as ', for phrase matching."""
    return pc.replace_substring_regex(folded, APOSTROPHES, "'")


def empty_response(response: pa.Array) -> RuleResult:
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(response), ""), True)
    nulls = _numpy(pc.is_null(response))
    return RuleResult(
        failed=_numpy(blank).astype(bool),
        detail=lambda i: "response is null" if nulls[i] else "response is blank",
    )


def response_equals_instruction(folded_instruction: pa.Array,
                                folded_response: pa.Array) -> RuleResult:
    same = pc.and_(pc.equal(folded_instruction, folded_response),
                   pc.not_equal(folded_response, ""))  # a blank response is empty_response's
    return RuleResult(
        failed=_numpy(same).astype(bool),
        detail=lambda i: "response equals the instruction (after NFKC, case and whitespace "
        "folding)",
    )


def refusal(folded_response: pa.Array, phrases: Sequence[str]) -> RuleResult:
    """The first phrase (in list order) found anywhere in the folded response."""
    response = fold_phrase_text(folded_response)
    folded_phrases = fold_phrase_text(fold_text(pa.array(list(phrases), pa.string())))
    first = np.full(len(response), -1, np.int64)
    for index, phrase in enumerate(folded_phrases.to_pylist()):
        found = _numpy(pc.match_substring(response, phrase)).astype(bool)
        first[(first < 0) & found] = index
    return RuleResult(
        failed=first >= 0,
        detail=lambda i: f"response contains refusal phrase {phrases[first[i]]!r}",
    )


def non_printable(texts: Sequence[pa.Array], max_ratio: float) -> RuleResult:
    """Share of non-printable characters over all the given texts of a row."""
    counts = sum(_numpy(pc.fill_null(pc.count_substring_regex(t, NON_PRINTABLE), 0))
                 .astype(np.int64) for t in texts)
    chars = sum(_chars(t) for t in texts)
    ratio = np.divide(counts, chars, out=np.zeros(len(chars)), where=chars > 0)
    return RuleResult(
        failed=ratio > max_ratio,
        detail=lambda i: f"{counts[i]} of {chars[i]} chars ({ratio[i]:.1%}) are non-printable "
        f"> max_non_printable_ratio {max_ratio}",
    )


def repeated_ngram_counts(folded: pa.Array,
                          n: int = REPEAT_NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """(word n-grams, those repeating an earlier n-gram of the same text) per row of folded
    text; a text of fewer than n words has none."""
    words = split_words(folded)
    grams, rows = ngram_hashes(words.hashes, words.offsets, n, whole_if_shorter=False)
    total = np.bincount(rows, minlength=words.rows)
    _, distinct_rows = distinct_per_row(grams, rows)
    distinct = np.bincount(distinct_rows, minlength=words.rows)
    return total, total - distinct


def repeated_ngrams(named_texts: dict[str, pa.Array], max_ratio: float) -> RuleResult:
    """Fails a row when any of its folded texts (checked in the given order) repeats more than
    max_ratio of its word 3-grams."""
    rows = len(next(iter(named_texts.values())))
    worst = np.full(rows, -1, np.int64)
    measured: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for index, text in enumerate(named_texts.values()):
        total, repeated = repeated_ngram_counts(text)
        ratio = np.divide(repeated, total, out=np.zeros(rows), where=total > 0)
        worst[(worst < 0) & (ratio > max_ratio)] = index
        measured.append((total, repeated, ratio))
    names = list(named_texts)

    def detail(i: int) -> str:
        total, repeated, ratio = measured[worst[i]]
        return (f"{names[worst[i]]}: {repeated[i]} of {total[i]} word 3-grams ({ratio[i]:.0%}) "
                f"repeat > max_repeated_ngram_ratio {max_ratio}")

    return RuleResult(failed=worst >= 0, detail=detail)


def _count(value: int, unit: str) -> str:
    return f"{value} {unit.removesuffix('s') if value == 1 else unit}"


def at_least(values: np.ndarray, limit: int, unit: str, field: str) -> RuleResult:
    return RuleResult(failed=values < limit,
                      detail=lambda i: f"{_count(int(values[i]), unit)} < {field} {limit}")


def at_most(values: np.ndarray, limit: int, unit: str, field: str) -> RuleResult:
    return RuleResult(failed=values > limit,
                      detail=lambda i: f"{_count(int(values[i]), unit)} > {field} {limit}")


class RowTexts:
    """The texts of a batch the rules look at; measurements are computed once, when needed."""

    def __init__(self, instruction: pa.Array, context: pa.Array | None,
                 response: pa.Array | None) -> None:
        self.instruction = pc.fill_null(instruction, "")
        self.context = context
        self.response = response  # nulls kept: a null response is empty_response

    def take(self, indices: pa.Array) -> RowTexts:
        return RowTexts(
            self.instruction.take(indices),
            self.context.take(indices) if self.context is not None else None,
            self.response.take(indices) if self.response is not None else None,
        )

    @property
    def prompt_parts(self) -> list[pa.Array]:
        return [self.instruction] + ([self.context] if self.context is not None else [])

    @property
    def all_parts(self) -> list[pa.Array]:
        return self.prompt_parts + ([self.response] if self.response is not None else [])

    @cached_property
    def folded_instruction(self) -> pa.Array:
        return fold_text(self.instruction)

    @cached_property
    def folded_response(self) -> pa.Array:
        return fold_text(self.response)

    @cached_property
    def prompt_chars(self) -> np.ndarray:
        return sum(_chars(t) for t in self.prompt_parts)

    @cached_property
    def response_chars(self) -> np.ndarray:
        return _chars(self.response)

    @cached_property
    def tokens(self) -> np.ndarray:
        return sum(token_counts(t) for t in self.all_parts)


Rule = Callable[[RowTexts], RuleResult]


def enabled_rules(spec: FilterStepSpec, with_response: bool) -> dict[str, Rule]:
    """The rules the spec turns on, in RULE_ORDER; response rules only with a response."""
    phrases = spec.refusal_phrases if spec.refusal_phrases is not None else \
        DEFAULT_REFUSAL_PHRASES
    candidates: dict[str, Rule | None] = {
        "empty_response": (lambda t: empty_response(t.response))
        if spec.reject_empty_response else None,
        "response_equals_instruction": (
            lambda t: response_equals_instruction(t.folded_instruction, t.folded_response))
        if spec.reject_response_equals_instruction else None,
        "refusal": (lambda t: refusal(t.folded_response, phrases))
        if spec.reject_refusals and phrases else None,
        "non_printable": (lambda t: non_printable(t.all_parts, spec.max_non_printable_ratio))
        if spec.max_non_printable_ratio is not None else None,
        "repeated_ngrams": (lambda t: repeated_ngrams(_repeat_texts(t),
                                                      spec.max_repeated_ngram_ratio))
        if spec.max_repeated_ngram_ratio is not None else None,
        "min_chars": _limit(at_least, "prompt_chars", spec.min_chars, "chars", "min_chars"),
        "max_chars": _limit(at_most, "prompt_chars", spec.max_chars, "chars", "max_chars"),
        "min_response_chars": _limit(at_least, "response_chars", spec.min_response_chars,
                                     "chars", "min_response_chars"),
        "max_response_chars": _limit(at_most, "response_chars", spec.max_response_chars,
                                     "chars", "max_response_chars"),
        "min_tokens": _limit(at_least, "tokens", spec.min_tokens, "tokens", "min_tokens"),
        "max_tokens": _limit(at_most, "tokens", spec.max_tokens, "tokens", "max_tokens"),
    }
    return {name: rule for name in RULE_ORDER
            if (rule := candidates[name]) is not None
            and (with_response or name not in RESPONSE_RULES)}


def _limit(check: Callable[..., RuleResult], measure: str, limit: int | None, unit: str,
           field: str) -> Rule | None:
    if limit is None:
        return None
    return lambda texts: check(getattr(texts, measure), limit, unit, field)


def _repeat_texts(texts: RowTexts) -> dict[str, pa.Array]:
    named = {"instruction": texts.folded_instruction}
    if texts.response is not None:
        named["response"] = texts.folded_response
    return named


def first_failures(rules: dict[str, Rule], texts: RowTexts,
                   rows: int) -> tuple[list[str | None], list[str | None]]:
    """Reason and detail per row: the first rule (in the dict's order) the row fails."""
    reasons: list[str | None] = [None] * rows
    details: list[str | None] = [None] * rows
    undecided = np.ones(rows, bool)
    for name, rule in rules.items():
        result = rule(texts)
        for i in np.flatnonzero(undecided & result.failed):
            reasons[i] = name
            details[i] = result.detail(int(i))
        undecided &= ~result.failed
        if not undecided.any():
            break
    return reasons, details


def _required_column(table: pa.Table, name: str, step: str) -> pa.Array:
    require_columns(table, step, [name], "fix `steps[].instruction_column`")
    return _text(table, name, step)


def _text(table: pa.Table, name: str, step: str) -> pa.Array:
    [column] = text_columns(table, [name], step)
    return as_array(column)


def row_texts(table: pa.Table, spec: FilterStepSpec, step: str,
              with_response: bool) -> RowTexts:
    instruction = _required_column(table, spec.instruction_column, step)
    context = _text(table, "input", step) if "input" in table.column_names and \
        spec.instruction_column != "input" else None
    response = _text(table, spec.response_column, step) if with_response else None
    return RowTexts(instruction, context, response)


def filter_table(table: pa.Table, spec: FilterStepSpec, step: str,
                 response_rules: bool = True) -> pa.Table:
    """Reject the live rows that break a rule; rows rejected earlier pass through untouched.
    Response rules run only when `response_rules` and the rows have the response column."""
    with_response = response_rules and spec.response_column in table.column_names
    texts = row_texts(table, spec, step, with_response)  # checks the columns even if no row lives
    live = live_positions(table)
    if not live.size:
        return table
    if live.size < len(table):
        texts = texts.take(pa.array(live))
    reasons, details = first_failures(enabled_rules(spec, with_response), texts, live.size)
    return reject_at(table, live, reasons, details, step)
