"""Words, tokens and word n-gram hashes of a text column, vectorized with pyarrow and numpy.

A word is a run of letters, digits, marks and `_`; each CJK character (Han, kana, Hangul) is a
word of its own, since those scripts put no spaces between words. Everything else separates
words. A token (for length limits) is a word or a single punctuation/symbol character.

Each distinct word of a batch gets the first 8 bytes of its BLAKE2b digest (curate.hashing.hash64);
word n-grams are hashed from those by curate.hashing.ngram_hashes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.curate.hashing import as_array, hash64

# The one definition of CJK in the package (RE2 classes, as pyarrow.compute takes them): Han
# ideographs (what makes a text Chinese, tasks.base.detect_language), and with kana and Hangul
# the scripts written without spaces between words, where each character is a word.
HAN = r"\p{Han}"
CJK = HAN + r"\p{Hiragana}\p{Katakana}\p{Hangul}"  # the body of a character class
CJK_CHAR = rf"([{CJK}])"
LETTER = r"\p{L}"
NON_WORD = r"[^\p{L}\p{N}\p{M}_]+"
TOKEN = r"[\p{L}\p{N}\p{M}_]+|[^\s\p{L}\p{N}\p{M}_]"



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


def _space_cjk(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(text, CJK_CHAR, r" \1 ")


def token_counts(text: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Words plus punctuation/symbol characters per row (null counts 0)."""
    counts = pc.count_substring_regex(_space_cjk(as_array(text)), TOKEN)
    return pc.fill_null(counts, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def words(text: str) -> list[str]:
    """The words of one string, as split_words splits a column (text as given: fold it
    first to compare)."""
    lists = pc.split_pattern_regex(_space_cjk(pa.array([text], pa.string())), NON_WORD)
    return [word for word in lists[0].as_py() if word]


def han_share(text: str) -> float:
    """The share of a string's letters that are Han ideographs (0.0 without letters)."""
    array = pa.array([text], pa.string())
    letters = pc.count_substring_regex(array, LETTER)[0].as_py()
    return pc.count_substring_regex(array, HAN)[0].as_py() / letters if letters else 0.0


def split_words(text: pa.Array | pa.ChunkedArray) -> Words:
    """Hash every word of every row (text is expected folded already; null rows have none)."""
    text = as_array(text)
    lists = pc.split_pattern_regex(_space_cjk(text), NON_WORD)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    nonempty = pc.not_equal(flat, "")
    flat = flat.filter(nonempty)
    parents = parents.filter(nonempty).to_numpy(zero_copy_only=False)
    # hash each distinct word once: the vocabulary of a batch is much smaller than its words
    encoded = pc.dictionary_encode(flat)
    vocabulary = hash64(encoded.dictionary.to_pylist())
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    hashes = vocabulary[indices] if len(indices) else np.empty(0, np.uint64)
    counts = np.bincount(parents, minlength=len(text)) if len(parents) else np.zeros(
        len(text), np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Words(hashes=hashes, offsets=offsets)


def distinct_per_row(grams: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (hash, row) pairs, sorted by row then hash."""
    if not len(grams):
        return grams, rows
    order = np.lexsort((grams, rows))
    grams, rows = grams[order], rows[order]
    first = np.ones(len(grams), bool)
    first[1:] = (grams[1:] != grams[:-1]) | (rows[1:] != rows[:-1])
    return grams[first], rows[first]
