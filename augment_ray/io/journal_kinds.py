"""What the journal keeps: request keys, and per kind of result its file schema and codec.

A key names one result whatever batch, actor or attempt produced it (see journal.py). The replay
index does not keep keys as strings: `key_hashes` turns each into a 64-bit number (the first 16
hex digits of a request key are already 64 bits of a SHA-256), so a million keys are an 8 MB
numpy array instead of a million Python strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, Messages, numbered_copies

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("text", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("logprobs", pa.string()),  # JSON list of {token: logprob}, or null
])
VECTOR_SCHEMA = pa.schema([("key", pa.string()), ("vector", pa.list_(pa.float32()))])
KEY_CHARS = 32  # request_key's length: 128 bits of SHA-256 in hex


def request_key(messages_json: str, sampling_json: str, salt: str) -> str:
    payload = f"{messages_json}\x1f{sampling_json}\x1f{salt}".encode()
    return hashlib.sha256(payload).hexdigest()[:KEY_CHARS]


def request_keys(prompts: Sequence[Messages], sampling: SamplingParams) -> list[str]:
    """One key per request of an engine call; the n-th copy of the same prompt in the call (an
    expansion's n, a consistency sample) gets its own key, as engines sample each copy anew."""
    sampling_json = sampling.model_dump_json()
    return [request_key(text, sampling_json, str(copy)) for text, copy in numbered_copies(prompts)]


def embedding_key(model: str, text: str) -> str:
    """`model` names the model and everything that changes its vectors (e.g. the token cut)."""
    return request_key(model, text, "embedding")


_HEX_DIGITS = frozenset("0123456789abcdef")
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def key_hash(key: str) -> int:
    """The 64-bit number the index keeps for `key` (equal to key_hashes([key])[0])."""
    if len(key) == KEY_CHARS and set(key) <= _HEX_DIGITS:
        return int(key[:16], 16)
    return _other_hash(key)


def _other_hash(key: str) -> int:
    # keys not made by request_key (none today): hash them so they still get 64 bits
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def key_hashes(keys: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """key_hash of every key, as uint64, vectorized for request keys (32 lowercase hex)."""
    array = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(keys, pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = array.cast(pa.string())
    n = len(array)
    if not n:
        return np.zeros(0, np.uint64)
    fast = _hex_prefixes(array)
    if fast is not None:
        return fast
    return np.fromiter((key_hash(k) for k in array.to_pylist()), np.uint64, count=n)


def _hex_prefixes(array: pa.StringArray) -> np.ndarray | None:
    """The first 16 hex digits of each key as a number, or None unless every key is a
    32-character lowercase hex string."""
    if array.null_count:
        return None
    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + n + 1]
    if not (np.diff(offsets) == KEY_CHARS).all():
        return None
    chars = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    nibbles = _HEX[chars.reshape(n, KEY_CHARS)]
    if (nibbles == 255).any():
        return None
    value = np.zeros(n, np.uint64)
    for column in range(16):
        value = (value << np.uint64(4)) | nibbles[:, column].astype(np.uint64)
    return value


def to_table(keys: Sequence[str], completions: Sequence[Completion]) -> pa.Table:
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "text": pa.array([c.text for c in completions], pa.string()),
        "prompt_tokens": pa.array([c.prompt_tokens for c in completions], pa.int32()),
        "completion_tokens": pa.array([c.completion_tokens for c in completions], pa.int32()),
        "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
        "logprobs": pa.array([None if c.logprobs is None else json.dumps(c.logprobs)
                              for c in completions], pa.string()),
    }, schema=SCHEMA)


def completions_of(table: pa.Table) -> list[Completion]:
    values = table.select(SCHEMA.names).to_pylist()
    return [Completion(
        text=v["text"], prompt_tokens=v["prompt_tokens"],
        completion_tokens=v["completion_tokens"], finish_reason=v["finish_reason"],
        logprobs=None if v["logprobs"] is None else tuple(json.loads(v["logprobs"])),
    ) for v in values]


def vectors_table(keys: Sequence[str], vectors: Sequence[np.ndarray] | np.ndarray) -> pa.Table:
    matrix = np.asarray(vectors, dtype=np.float32).reshape(len(keys), -1)
    offsets = np.arange(len(keys) + 1, dtype=np.int32) * matrix.shape[1]
    return pa.table({"key": pa.array(keys, pa.string()),
                     "vector": pa.ListArray.from_arrays(pa.array(offsets),
                                                        pa.array(matrix.reshape(-1)))},
                    schema=VECTOR_SCHEMA)


def vectors_of(table: pa.Table) -> list[np.ndarray]:
    column = table["vector"].combine_chunks()
    if not len(column):
        return []
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return list(flat.reshape(len(column), -1))


@dataclass(frozen=True)
class JournalKind:
    """One kind of journaled result: its file schema (`key` first) and its codec."""

    name: str
    schema: pa.Schema
    encode: Callable[[Sequence[str], Sequence[Any]], pa.Table]
    decode: Callable[[pa.Table], list[Any]]  # every row of a table -> its value


COMPLETIONS = JournalKind("completion", SCHEMA, to_table, completions_of)
VECTORS = JournalKind("vector", VECTOR_SCHEMA, vectors_table, vectors_of)
KINDS = {kind.name: kind for kind in (COMPLETIONS, VECTORS)}
