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

Replay scales with the journal (journal_compact.py, journal_index.py): `Journal.open`, on the
driver, folds earlier attempts' one-call files into a few compacted files and builds an index of
16 bytes per answer (key hash, row group, row), read from the key columns only; the index goes in
the object store once and actors read only the row groups their requests fall in. Neither the
driver nor an actor ever holds all earlier answers.

One mechanism, several kinds of result (`JournalKind`: the columns besides `key` and how values
become rows and back): `GenerationJournal` keeps completions, keyed by request;
`EmbeddingJournal` keeps embedding vectors, keyed by (model, text).
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, GenerationFailure, Messages
from augment_ray.io.journal_compact import COMPACTED, compact, list_journal
from augment_ray.io.journal_index import (
    EMPTY_DATA,
    IndexData,
    JournalIndex,
    build_index,
    read_keys,
)
from augment_ray.io.journal_kinds import (
    COMPLETIONS,
    KINDS,
    SCHEMA,
    VECTOR_SCHEMA,
    VECTORS,
    JournalKind,
    completions_of,
    embedding_key,
    key_hash,
    key_hashes,
    request_key,
    request_keys,
    to_table,
    vectors_of,
    vectors_table,
)
from augment_ray.storage import Location, describe_os_error

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

__all__ = [
    "COMPACTED", "COMPLETIONS", "EMPTY_INDEX", "KINDS", "SCHEMA", "VECTORS", "VECTOR_SCHEMA",
    "WORK_DIR", "EmbeddingJournal", "GenerationJournal", "IndexData", "Journal", "JournalIndex",
    "JournalKind", "completions_of", "embedding_key", "journaled_counts", "key_hash",
    "key_hashes", "read_journal", "request_key", "request_keys", "to_table", "vectors_of",
    "vectors_table",
]

log = logging.getLogger(__name__)

WORK_DIR = "_work"
EMPTY_INDEX = JournalIndex(EMPTY_DATA, COMPLETIONS)


@lru_cache(maxsize=4)
def _index(ref: ray.ObjectRef, kind: str, folder: Location) -> JournalIndex:
    """Once per worker process for each journal: the arrays are views of the object store's
    copy, shared by the workers of a node."""
    return JournalIndex(ray.get(ref), KINDS[kind], folder.fs)


@lru_cache(maxsize=len(KINDS))
def _empty_index(kind: str) -> JournalIndex:
    return EMPTY_INDEX if kind == COMPLETIONS.name else JournalIndex(EMPTY_DATA, KINDS[kind])


def open_index(folder: Location, run_id: str, kind: JournalKind) -> IndexData:
    """Compact what earlier attempts left in `folder`, then index every answer there."""
    files = list_journal(folder, run_id)
    compacted = read_keys(folder.fs, files.compacted)
    if files.earlier:
        known = build_index(compacted).hashes
        written = compact(folder, files.earlier, known, kind)
        compacted += [written] if written else []
    return build_index(compacted + read_keys(folder.fs, files.current))


@dataclass
class Journal:
    """One pool's journal of one kind of result. Built on the driver (open), used inside actors
    and tasks."""

    kind: ClassVar[JournalKind] = COMPLETIONS

    folder: Location
    run_id: str
    earlier: ray.ObjectRef | None = None  # IndexData over earlier attempts' results
    earlier_count: int = 0
    # set in a restarted actor only: earlier attempts' results plus this run's own so far
    reopened: JournalIndex | None = None

    @classmethod
    def open(cls, work: Location, pool: str, run_id: str) -> Self:
        folder = work.join(pool)
        index = open_index(folder, run_id, cls.kind)
        if not len(index):
            return cls(folder, run_id)
        log.info("%s: %d results from an earlier attempt will be replayed", pool, len(index))
        return cls(folder, run_id, ray.put(index), len(index))

    def for_this_actor(self) -> Self:
        """The journal as this actor should use it. An actor Ray restarted (its process or its
        node died) also replays what this run journaled before it died (its predecessor's
        answers to the batches now retried): the driver's index has earlier attempts only."""
        if not ray.is_initialized():
            return self
        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = context.get_actor_id() is not None and \
                context.was_current_actor_reconstructed
        if not reconstructed:
            return self  # a first incarnation, or not in an actor at all (a task, a test)
        files = list_journal(self.folder, self.run_id)
        index = build_index(read_keys(self.folder.fs,
                                      files.compacted + files.earlier + files.current))
        log.info("%s: restarted actor; %d results journaled so far will be replayed",
                 self.folder.uri, len(index))
        return replace(self, reopened=JournalIndex(index, self.kind, self.folder.fs))

    def answers(self) -> JournalIndex:
        if self.reopened is not None:
            return self.reopened
        if self.earlier is None:
            return _empty_index(self.kind.name)
        return _index(self.earlier, self.kind.name, self.folder)

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
        results: list[Completion | GenerationFailure | None] = self.answers().get_many(keys)
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
    """Every result journaled under `folder`, copies included, as one table: for inspection
    and tests (replay never loads this). An unreadable file is skipped with a warning."""
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
