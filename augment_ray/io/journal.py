"""The generation journal: model answers already paid for, so a rerun after a crash replays them.

Every engine call appends its answers to <output>/_work/<pool>/<run_id>-<n>.parquet (one file
per call: a single PUT on object stores, write-then-rename on local disks, so a file is either
whole or absent). When a run of the same job starts over the top of an unfinished attempt, each
engine pool loads what earlier attempts journaled and answers those requests from it instead of
the model; everything else in the pipeline (reading, filters, dedup, thresholds) is cheap and
deterministic and simply runs again. The run then writes its output afresh and commits it, so the
result is exactly that of an uninterrupted run: no row twice, none missing. `_work/` is deleted
when the run commits.

Why answers and not input shards or Ray Data's row checkpointing: a shard's rows fan out over
batches, actors, expansion steps (one seed -> n new rows in other blocks) and barrier steps (dedup,
dataset-wide thresholds) that regroup every row, so "shard k is done" is not observable without
turning every step into a barrier; Ray Data's checkpointing filters input rows by an id column
that must survive every operator, which rows created by expansion do not have and barrier steps
cannot resume. The model calls are where the time goes (seconds per row against microseconds for
everything else), and a request key (messages + sampling + which copy) names one answer whatever
batch, actor or attempt produced it.

One mechanism, several kinds of result (`JournalKind`: the columns besides `key` and how values
become rows and back): `GenerationJournal` keeps completions, keyed by request;
`EmbeddingJournal` keeps embedding vectors, keyed by (model, text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, GenerationFailure, Messages, numbered_copies
from augment_ray.storage import Location, describe_os_error

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

log = logging.getLogger(__name__)

WORK_DIR = "_work"
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("text", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("logprobs", pa.string()),  # JSON list of {token: logprob}, or null
])


def request_key(messages_json: str, sampling_json: str, salt: str) -> str:
    payload = f"{messages_json}\x1f{sampling_json}\x1f{salt}".encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def request_keys(prompts: Sequence[Messages], sampling: SamplingParams) -> list[str]:
    """One key per request of an engine call; the n-th copy of the same prompt in the call (an
    expansion's n, a consistency sample) gets its own key, as engines sample each copy anew."""
    sampling_json = sampling.model_dump_json()
    return [request_key(text, sampling_json, str(copy)) for text, copy in numbered_copies(prompts)]


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


VECTOR_SCHEMA = pa.schema([("key", pa.string()), ("vector", pa.list_(pa.float32()))])


def embedding_key(model: str, text: str) -> str:
    """`model` names the model and everything that changes its vectors (e.g. the token cut)."""
    return request_key(model, text, "embedding")


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


class JournalIndex:
    """Earlier results by key. They stay one Arrow table (shared memory when it comes from the
    object store); only the key -> row map is Python, and values are decoded on lookup."""

    def __init__(self, table: pa.Table, kind: JournalKind = COMPLETIONS) -> None:
        self.table = table.combine_chunks()
        self.kind = kind
        self.rows = {key: i for i, key in enumerate(self.table["key"].to_pylist())}

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> Any:
        row = self.rows.get(key)
        return None if row is None else self.kind.decode(self.table.slice(row, 1))[0]

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        """The value of each key, None where none was journaled (one decode for all)."""
        rows = [self.rows.get(key) for key in keys]
        found = [row for row in rows if row is not None]
        if not found:
            return [None] * len(keys)
        values = iter(self.kind.decode(self.table.take(pa.array(found, pa.int64()))))
        return [None if row is None else next(values) for row in rows]

    def __getitem__(self, key: str) -> Any:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found


EMPTY_INDEX = JournalIndex(SCHEMA.empty_table())


@lru_cache(maxsize=4)
def _index(ref: ray.ObjectRef, kind: str = COMPLETIONS.name) -> JournalIndex:
    """Built once per worker process for each journal."""
    return JournalIndex(ray.get(ref), KINDS[kind])


@lru_cache(maxsize=len(KINDS))
def _empty_index(kind: str) -> JournalIndex:
    return EMPTY_INDEX if kind == COMPLETIONS.name else JournalIndex(
        KINDS[kind].schema.empty_table(), KINDS[kind])


@dataclass
class Journal:
    """One pool's journal of one kind of result. Built on the driver (open), used inside actors
    and tasks."""

    kind: ClassVar[JournalKind] = COMPLETIONS

    folder: Location
    run_id: str
    earlier: ray.ObjectRef | None = None  # Arrow table of earlier attempts' results
    earlier_count: int = 0

    @classmethod
    def open(cls, work: Location, pool: str, run_id: str) -> Self:
        folder = work.join(pool)
        table = read_journal(folder, cls.kind.schema)
        if not len(table):
            return cls(folder, run_id)
        log.info("%s: %d results from an earlier attempt will be replayed", pool, len(table))
        return cls(folder, run_id, ray.put(table), len(table))

    def answers(self) -> JournalIndex:
        if self.earlier is None:
            return _empty_index(self.kind.name)
        return _index(self.earlier, self.kind.name)

    def keep(self, value: Any) -> bool:
        """Whether a result is journaled (a failure is not: a rerun asks again)."""
        return True

    def record(self, keys: Sequence[str], results: Sequence[Any]) -> None:
        """Journal the results of one call, as one file."""
        done = [(k, r) for k, r in zip(keys, results, strict=True) if self.keep(r)]
        if not done:
            return
        table = self.kind.encode([k for k, _ in done], [r for _, r in done])
        name = f"{self.run_id}-{uuid.uuid4().hex[:12]}.parquet"
        fs, base = self.folder.fs, self.folder.path
        try:
            if self.folder.is_local:
                fs.create_dir(base, recursive=True)
                pq.write_table(table, f"{base}/.tmp-{name}", filesystem=fs)
                fs.move(f"{base}/.tmp-{name}", f"{base}/{name}")
            else:  # an object appears whole on close, or not at all
                pq.write_table(table, f"{base}/{name}", filesystem=fs)
        except (OSError, pa.ArrowException) as error:
            raise describe_os_error(self.folder, "journal answers to", error) from None


@dataclass
class GenerationJournal(Journal):
    """One engine pool's journal of model answers (Completion), keyed by request."""

    kind: ClassVar[JournalKind] = COMPLETIONS

    def keep(self, value: Any) -> bool:
        return isinstance(value, Completion)

    def generate(self, generate: Callable[[list[Messages], SamplingParams], list[Any]],
                 prompts: list[Messages], sampling: SamplingParams
                 ) -> list[Completion | GenerationFailure]:
        """generate(prompts, sampling), answering what earlier attempts already answered."""
        keys = request_keys(prompts, sampling)
        known = self.answers()
        results: list[Completion | GenerationFailure | None] = [known.get(k) for k in keys]
        todo = [i for i, result in enumerate(results) if result is None]
        if todo:
            fresh = generate([prompts[i] for i in todo], sampling)
            self.record([keys[i] for i in todo], fresh)
            for index, result in zip(todo, fresh, strict=True):
                results[index] = result
        return [result for result in results if result is not None]


@dataclass
class EmbeddingJournal(Journal):
    """One embedding pool's journal of vectors (float32, as the model gave them), keyed by
    (model, text): a rerun replays them exactly, so everything computed from them repeats."""

    kind: ClassVar[JournalKind] = VECTORS

    def embed(self, embed: Callable[[list[str]], np.ndarray], model: str,
              texts: list[str]) -> np.ndarray:
        """embed(texts), replaying vectors earlier attempts journaled; one row per text."""
        if not texts:
            return np.asarray(embed([]), dtype=np.float32)
        keys = [embedding_key(model, text) for text in texts]
        known = self.answers().get_many(keys)
        todo = [i for i, vector in enumerate(known) if vector is None]
        if todo:
            fresh = np.asarray(embed([texts[i] for i in todo]), dtype=np.float32)
            self.record([keys[i] for i in todo], list(fresh))
            for index, vector in zip(todo, fresh, strict=True):
                known[index] = vector
        return np.stack(known).astype(np.float32, copy=False)


def read_journal(folder: Location, schema: pa.Schema = SCHEMA) -> pa.Table:
    """Every result journaled under `folder` (an unreadable file is skipped with a warning: its
    requests are simply asked again)."""
    try:
        listing = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(folder, "list", error) from None
    tables = []
    for item in sorted(listing, key=lambda i: i.path):
        if item.type != pafs.FileType.File or not item.base_name.endswith(".parquet") or \
                item.base_name.startswith((".", "_")):
            continue
        try:
            tables.append(pq.read_table(item.path, filesystem=folder.fs, schema=schema))
        except (OSError, pa.ArrowException) as error:
            log.warning("skipping unreadable journal file %s: %s", item.path, error)
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def journaled_counts(work: Location, run_id: str) -> dict[str, dict[str, int]]:
    """Per pool: answers replayable from earlier attempts vs generated by run `run_id`."""
    counts: dict[str, dict[str, int]] = {}
    try:
        listing = work.fs.get_file_info(pafs.FileSelector(work.path, recursive=True,
                                                          allow_not_found=True))
    except (OSError, pa.ArrowException):
        return counts
    for item in listing:
        if item.type != pafs.FileType.File or not item.base_name.endswith(".parquet") or \
                item.base_name.startswith("."):
            continue
        pool = item.path[len(work.path.rstrip("/")) + 1:].split("/", 1)[0]
        try:
            rows = pq.ParquetFile(work.fs.open_input_file(item.path)).metadata.num_rows
        except (OSError, pa.ArrowException):
            continue
        entry = counts.setdefault(pool, {"replayed": 0, "generated": 0})
        entry["generated" if item.base_name.startswith(run_id) else "replayed"] += rows
    return counts
