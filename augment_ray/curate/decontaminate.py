"""Decontamination: reject rows that share too many word n-grams with one evaluation item.

Driver side, the eval sets are read once into an NgramIndex: the distinct (n-gram hash, eval
item) pairs, sorted by hash. Worker side, a row's distinct n-grams are looked up with a binary
search, and the row's score is the share of them found in the single eval item that holds the
most. Texts are folded (NFKC, case, whitespace) and split into words as curate.words does; a text
with fewer than n words counts as one n-gram of all its words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.config.io import InputSpec
from augment_ray.curate.hashing import as_array, ngram_hashes
from augment_ray.curate.text import FOLD, fold, joined_text, text_columns
from augment_ray.curate.verdicts import live_positions, reject_at
from augment_ray.curate.words import distinct_per_row, split_words
from augment_ray.errors import AugmentRayError, InputDataError
from augment_ray.io.read import list_input_shards, read_shard_batches
from augment_ray.storage import location

if TYPE_CHECKING:
    from augment_ray.steps.decontaminate import EvalSetSpec

REASON = "contaminated"
# most (row, eval item) pairs expanded at once; bounds memory when n-grams are common
MAX_PAIRS = 4_000_000


@dataclass(frozen=True)
class NgramIndex:
    """Every eval set's n-grams. Only numpy arrays of fixed-size types, so a worker's ray.get
    maps it from the object store without copying or unpickling element by element."""

    n: int
    hashes: np.ndarray  # uint64, sorted
    items: np.ndarray  # int64: the eval item of each hash (item numbers are global)
    item_set: np.ndarray  # int64 per item: the set it belongs to
    item_label: np.ndarray  # str per item: its id_column value or its position in the set
    set_names: np.ndarray  # str per set

    def name_item(self, item: int) -> str:
        return f"{self.set_names[self.item_set[item]]} item {self.item_label[item]}"


@dataclass(frozen=True)
class EvalSetStats:
    name: str
    items: int
    ngrams: int  # distinct n-grams


@dataclass(frozen=True)
class EvalTexts:
    """The texts of one eval set: texts[k] belongs to item items[k]."""

    texts: pa.Array
    items: np.ndarray
    labels: list[str]


def _load_error(error: AugmentRayError, spec: EvalSetSpec, step: str) -> AugmentRayError:
    return type(error)(
        f"Step {step!r} cannot load eval set {spec.label!r} ({spec.uri}): {error}"
    )


def column_texts(table: pa.Table, column: str, where: str, set_name: str,
                 step: str) -> tuple[pa.Array, np.ndarray]:
    """(text, row position) of one column: a string column gives a text per row, a list of
    strings a text per element. Nulls give no text."""
    if column not in table.column_names:
        raise InputDataError(
            f"Step {step!r}: eval set {set_name!r} has no column {column!r} in {where} (its "
            f"columns are: {', '.join(table.column_names)}). Fix `eval_sets[].columns`."
        )
    values = as_array(table[column])
    kind = values.type
    if pa.types.is_dictionary(kind):
        values, kind = values.cast(kind.value_type), kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        element = kind.value_type
        if pa.types.is_string(element) or pa.types.is_large_string(element) or \
                pa.types.is_null(element):
            texts = pc.list_flatten(values).cast(pa.string())
            rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            return _drop_nulls(texts, rows)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return _drop_nulls(values.cast(pa.string()), np.arange(len(values)))
    raise InputDataError(
        f"Step {step!r}: column {column!r} of eval set {set_name!r} in {where} holds {kind}, "
        "not text or a list of text."
    )


def _drop_nulls(texts: pa.Array, rows: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    valid = pc.is_valid(texts)
    return texts.filter(valid), rows[valid.to_numpy(zero_copy_only=False)]


def read_eval_set(spec: EvalSetSpec, step: str) -> EvalTexts:
    """Every text of the set's columns with its item: files in sorted order, rows in order."""
    shards_of = InputSpec(uri=spec.uri, storage=spec.storage)
    try:
        shards = list_input_shards(shards_of)
        loc = location(spec.uri, spec.storage)
        texts: list[pa.Array] = []
        items: list[np.ndarray] = []
        labels: list[str] = []
        for shard in shards:
            for table in read_shard_batches(loc, shard):
                for column in spec.columns:
                    column_text, rows = column_texts(table, column, shard.path, spec.label,
                                                     step)
                    texts.append(column_text)
                    items.append(rows + len(labels))
                labels += item_labels(table, spec, len(labels), shard.path, step)
    except AugmentRayError as error:
        if str(error).startswith(f"Step {step!r}"):
            raise
        raise _load_error(error, spec, step) from None
    return EvalTexts(
        texts=pa.concat_arrays(texts) if texts else pa.array([], pa.string()),
        items=np.concatenate(items) if items else np.empty(0, np.int64),
        labels=labels,
    )


def item_labels(table: pa.Table, spec: EvalSetSpec, first: int, where: str,
                step: str) -> list[str]:
    if spec.id_column is None:
        return [str(first + i) for i in range(len(table))]
    if spec.id_column not in table.column_names:
        raise InputDataError(
            f"Step {step!r}: eval set {spec.label!r} has no id_column {spec.id_column!r} in "
            f"{where} (its columns are: {', '.join(table.column_names)})."
        )
    return [str(first + i) if value is None else str(value)
            for i, value in enumerate(table[spec.id_column].to_pylist())]


def text_ngrams(texts: pa.Array | pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, text position) of each distinct n-gram of each folded text."""
    words = split_words(fold(texts))
    return distinct_per_row(*ngram_hashes(words.hashes, words.offsets, n, whole_if_shorter=True))


def build_index(specs: list[EvalSetSpec], n: int,
                step: str) -> tuple[NgramIndex, list[EvalSetStats]]:
    hashes: list[np.ndarray] = []
    items: list[np.ndarray] = []
    item_set: list[np.ndarray] = []
    labels: list[str] = []
    stats = []
    for set_number, spec in enumerate(specs):
        eval_texts = read_eval_set(spec, step)
        grams, positions = text_ngrams(eval_texts.texts, n)
        hashes.append(grams)
        items.append(eval_texts.items[positions] + len(labels))
        item_set.append(np.full(len(eval_texts.labels), set_number, np.int64))
        labels += eval_texts.labels
        stats.append(EvalSetStats(spec.label, len(eval_texts.labels),
                                  int(np.unique(grams).size)))
    for spec, stat in zip(specs, stats, strict=True):
        if not stat.ngrams:
            raise InputDataError(
                f"Step {step!r}: eval set {spec.label!r} ({spec.uri}) has no text in columns "
                f"{', '.join(spec.columns)}; check `eval_sets[].columns`."
            )
    # one pair per (n-gram, item): an item's repeated n-gram must count once for a row
    all_hashes, all_items = distinct_per_row(np.concatenate(hashes), np.concatenate(items))
    order = np.argsort(all_hashes, kind="stable")
    index = NgramIndex(
        n=n,
        hashes=all_hashes[order],
        items=all_items[order],
        item_set=np.concatenate(item_set),
        item_label=np.array(labels, dtype=str),
        set_names=np.array([spec.label for spec in specs], dtype=str),
    )
    return index, stats


@dataclass(frozen=True)
class Matches:
    """Per row: its words, distinct n-grams, and the most of them one eval item holds."""

    words: np.ndarray
    grams: np.ndarray
    shared: np.ndarray
    item: np.ndarray  # the item holding `shared` of them (lowest number on a tie); -1: none

    @property
    def share(self) -> np.ndarray:
        return np.divide(self.shared, self.grams, out=np.zeros(len(self.grams)),
                         where=self.grams > 0)


def best_matches(index: NgramIndex, text: pa.Array) -> Matches:
    """Score folded texts against the index."""
    words = split_words(text)
    grams, rows = distinct_per_row(*ngram_hashes(words.hashes, words.offsets, index.n,
                                                   whole_if_shorter=True))
    grams_per_row = np.bincount(rows, minlength=words.rows)
    shared = np.zeros(words.rows, np.int64)
    item = np.full(words.rows, -1, np.int64)
    low = np.searchsorted(index.hashes, grams, "left")
    hits = np.searchsorted(index.hashes, grams, "right") - low
    found = hits > 0
    rows, low, hits = rows[found], low[found], hits[found]
    for start, stop in row_aligned_chunks(rows, hits, MAX_PAIRS):
        _count_shared(index, rows[start:stop], low[start:stop], hits[start:stop], shared, item)
    return Matches(words=words.lengths, grams=grams_per_row, shared=shared, item=item)


def row_aligned_chunks(rows: np.ndarray, weights: np.ndarray,
                       limit: int) -> list[tuple[int, int]]:
    """Split positions (sorted by row) into runs of whole rows whose weights sum to about
    `limit` (a single row may exceed it)."""
    bounds = []
    cumulative = np.cumsum(weights)
    start = 0
    while start < len(rows):
        before = cumulative[start - 1] if start else 0
        stop = max(int(np.searchsorted(cumulative, before + limit, "right")), start + 1)
        stop = int(np.searchsorted(rows, rows[stop - 1], "right"))
        bounds.append((start, stop))
        start = stop
    return bounds


def _count_shared(index: NgramIndex, rows: np.ndarray, low: np.ndarray, hits: np.ndarray,
                  shared: np.ndarray, item: np.ndarray) -> None:
    """For whole rows: count each row's n-grams per eval item; keep the best item."""
    if not len(rows):
        return
    first_pair = np.cumsum(hits) - hits
    pair_index = np.arange(int(hits.sum())) + np.repeat(low - first_pair, hits)
    pair_rows = np.repeat(rows, hits)
    items_total = len(index.item_set)
    keys, counts = np.unique(pair_rows * items_total + index.items[pair_index],
                             return_counts=True)
    key_rows, key_items = np.divmod(keys, items_total)
    order = np.lexsort((key_items, -counts, key_rows))
    key_rows, key_items, counts = key_rows[order], key_items[order], counts[order]
    best = np.ones(len(key_rows), bool)
    best[1:] = key_rows[1:] != key_rows[:-1]
    shared[key_rows[best]] = counts[best]
    item[key_rows[best]] = key_items[best]


def contamination_detail(matches: Matches, row: int, index: NgramIndex, threshold: float) -> str:
    where = index.name_item(int(matches.item[row]))
    if matches.words[row] < index.n:
        return (f"the row's whole text ({matches.words[row]} words, fewer than ngram "
                f"{index.n}) matches {where}")
    return (f"{matches.share[row]:.0%} ({matches.shared[row]} of {matches.grams[row]}) of the "
            f"row's {index.n}-grams match {where} (threshold {threshold:.0%})")


def decontaminate_table(table: pa.Table, index: NgramIndex, columns: list[str],
                        threshold: float, step: str) -> pa.Table:
    """Reject live rows whose text shares at least `threshold` of its n-grams with one eval
    item; rows rejected earlier pass through untouched."""
    text_columns(table, columns, step)  # a missing column is an error even if no row lives
    live = live_positions(table)
    if not live.size:
        return table
    text = joined_text(table.take(pa.array(live)), columns, FOLD, step)
    matches = best_matches(index, text)
    contaminated = (matches.grams > 0) & (matches.share >= threshold)
    reasons = [REASON if hit else None for hit in contaminated.tolist()]
    details = [contamination_detail(matches, row, index, threshold) if hit else None
               for row, hit in enumerate(contaminated.tolist())]
    return reject_at(table, live, reasons, details, step)
