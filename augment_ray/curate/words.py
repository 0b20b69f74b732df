"""Words, tokens and word n-gram hashes of a text column, vectorized with pyarrow and numpy.

A word is a run of letters, digits, marks and `_`; each CJK character (Han, kana, Hangul) is a
word of its own, since those scripts put no spaces between words. Everything else separates
words. A token (for length limits) is a word or a single punctuation/symbol character.

Hashes are deterministic across processes and runs (never Python's salted hash()): each distinct
word gets the first 8 bytes of its BLAKE2b digest, and an n-gram's 64-bit hash mixes its words'
hashes in order, plus its length, with a splitmix64-style finalizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CJK_CHAR = r"([\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}])"
NON_WORD = r"[^\p{L}\p{N}\p{M}_]+"
TOKEN = r"[\p{L}\p{N}\p{M}_]+|[^\s\p{L}\p{N}\p{M}_]"

_SEED = np.uint64(0x243F6A8885A308D3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xD6E8FEB86659FD93)
_SHIFT = np.uint64(32)


@dataclass(frozen=True)
class Words:
    """The words of each row, flattened: row i's word hashes are hashes[offsets[i]:offsets[i+1]]."""

    hashes: np.ndarray  # uint64
    offsets: np.ndarray  # int64, one more than there are rows

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1


def _as_array(text: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(text, pa.ChunkedArray):
        return text.combine_chunks() if text.num_chunks else pa.array([], pa.string())
    return text


def _space_cjk(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(text, CJK_CHAR, r" \1 ")


def token_counts(text: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Words plus punctuation/symbol characters per row (null counts 0)."""
    counts = pc.count_substring_regex(_space_cjk(_as_array(text)), TOKEN)
    return pc.fill_null(counts, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def hash_strings(values: list[str]) -> np.ndarray:
    """First 8 bytes of BLAKE2b of each string's UTF-8, as uint64."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little")
         for v in values],
        dtype=np.uint64,
    )


def split_words(text: pa.Array | pa.ChunkedArray) -> Words:
    """Hash every word of every row (text is expected folded already; null rows have none)."""
    text = _as_array(text)
    lists = pc.split_pattern_regex(_space_cjk(text), NON_WORD)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    nonempty = pc.not_equal(flat, "")
    flat = flat.filter(nonempty)
    parents = parents.filter(nonempty).to_numpy(zero_copy_only=False)
    # hash each distinct word once: the vocabulary of a batch is much smaller than its words
    encoded = pc.dictionary_encode(flat)
    vocabulary = hash_strings(encoded.dictionary.to_pylist())
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    hashes = vocabulary[indices] if len(indices) else np.empty(0, np.uint64)
    counts = np.bincount(parents, minlength=len(text)) if len(parents) else np.zeros(
        len(text), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Words(hashes=hashes, offsets=offsets)


def _mix(acc: np.ndarray, value: np.ndarray | np.uint64) -> np.ndarray:
    x = (acc ^ value) * _GOLDEN
    x ^= x >> _SHIFT
    x *= _MIX
    x ^= x >> _SHIFT
    return x


def ngram_hashes(words: Words, n: int, whole_if_shorter: bool) -> tuple[np.ndarray, np.ndarray]:
    """(hash, row) of every word n-gram, rows in order. With whole_if_shorter, a row with 1 to
    n-1 words gives one n-gram of all its words (so short texts can still match each other)."""
    hashes, offsets, lengths = words.hashes, words.offsets, words.lengths
    total = len(hashes)
    parts_h: list[np.ndarray] = []
    parts_r: list[np.ndarray] = []
    with np.errstate(over="ignore"):
        if total >= n:
            windows = total - n + 1
            acc = np.full(windows, _SEED, np.uint64)
            for k in range(n):
                acc = _mix(acc, hashes[k:windows + k])
            acc = _mix(acc, np.uint64(n))
            row_of_word = np.repeat(np.arange(words.rows), lengths)[:windows]
            inside = np.arange(windows) + n <= offsets[row_of_word + 1]
            parts_h.append(acc[inside])
            parts_r.append(row_of_word[inside])
        if whole_if_shorter:
            short = np.flatnonzero((lengths > 0) & (lengths < n))
            if short.size:
                acc = np.full(short.size, _SEED, np.uint64)
                for k in range(int(lengths[short].max())):
                    has_word = k < lengths[short]
                    word = hashes[np.minimum(offsets[short] + k, total - 1)]
                    acc = np.where(has_word, _mix(acc, word), acc)
                acc = _mix(acc, lengths[short].astype(np.uint64))
                parts_h.append(acc)
                parts_r.append(short)
    if not parts_h:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    grams, rows = np.concatenate(parts_h), np.concatenate(parts_r).astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return grams[order], rows[order]


def distinct_per_row(grams: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (hash, row) pairs, sorted by row then hash."""
    if not len(grams):
        return grams, rows
    order = np.lexsort((grams, rows))
    grams, rows = grams[order], rows[order]
    first = np.ones(len(grams), bool)
    first[1:] = (grams[1:] != grams[:-1]) | (rows[1:] != rows[:-1])
    return grams[first], rows[first]
