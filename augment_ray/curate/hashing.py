"""Deterministic hashing shared by the curation steps (never Python's salted hash()).

Arithmetic is mod 2**64: numpy uint64 wraps, so the same text hashes the same in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_UNIT_BASE = np.uint64(0x100000001B3)


def as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (Arrow kernels hand back chunked arrays for table columns)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values


def hash64(values: Sequence[str | bytes | None]) -> np.ndarray:
    """First 8 bytes of BLAKE2b of each value (str as UTF-8, None as empty), as uint64."""
    out = np.empty(len(values), dtype=np.uint64)
    for i, value in enumerate(values):
        data = value.encode("utf-8") if isinstance(value, str) else (value or b"")
        out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return out


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
    return x


def ngram_hashes(units: np.ndarray, offsets: np.ndarray, n: int,
                 whole_if_shorter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hash of every n-gram of units (code points or word hashes) within each row, where row i
    is units[offsets[i]:offsets[i+1]] -> (hashes, row of each hash), rows in order. With
    whole_if_shorter a row of 1 to n-1 units gives one n-gram of all its units, so short texts
    can still match each other."""
    lengths = np.diff(offsets)
    short_count = np.minimum(lengths, 1) if whole_if_shorter else np.zeros_like(lengths)
    counts = np.where(lengths >= n, lengths - n + 1, short_count)
    rows = np.repeat(np.arange(len(lengths)), counts)
    if len(rows) == 0:
        return np.zeros(0, np.uint64), rows
    starts = offsets[:-1][rows] + (np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts,
                                                                    counts))
    ends = offsets[1:][rows]
    padded = np.concatenate([units.astype(np.uint64), np.zeros(n, np.uint64)])
    short = starts + n > ends  # only rows with fewer than n units have cut windows
    acc = np.full(len(rows), np.uint64(n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            value = padded[starts + k] + np.uint64(1)
            if short.any():
                value[short & (starts + k >= ends)] = 0
            acc = acc * _UNIT_BASE + value
    return mix64(acc), rows
