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
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, GenerationFailure, Messages, numbered_copies
from augment_ray.storage import Location, describe_os_error

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


class JournalIndex:
    """Earlier answers by key. The answers stay one Arrow table (shared memory when it comes from
    the object store); only the key -> row map is Python, and a Completion is built on lookup."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()
        self.rows = {key: i for i, key in enumerate(self.table["key"].to_pylist())}

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> Completion | None:
        row = self.rows.get(key)
        if row is None:
            return None
        value = {name: self.table[name][row].as_py() for name in SCHEMA.names}
        logprobs = value["logprobs"]
        return Completion(
            text=value["text"], prompt_tokens=value["prompt_tokens"],
            completion_tokens=value["completion_tokens"], finish_reason=value["finish_reason"],
            logprobs=None if logprobs is None else tuple(json.loads(logprobs)),
        )

    def __getitem__(self, key: str) -> Completion:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found


EMPTY_INDEX = JournalIndex(SCHEMA.empty_table())


@lru_cache(maxsize=4)
def _index(ref: ray.ObjectRef) -> JournalIndex:
    """Built once per worker process for each journal."""
    return JournalIndex(ray.get(ref))


@dataclass
class GenerationJournal:
    """One engine pool's journal. Built on the driver (open), used inside actors and tasks."""

    folder: Location
    run_id: str
    earlier: ray.ObjectRef | None = None  # Arrow table of earlier attempts' answers
    earlier_count: int = 0

    @classmethod
    def open(cls, work: Location, pool: str, run_id: str) -> GenerationJournal:
        folder = work.join(pool)
        table = read_journal(folder)
        if not len(table):
            return cls(folder, run_id)
        log.info("%s: %d answers from an earlier attempt will be replayed", pool, len(table))
        return cls(folder, run_id, ray.put(table), len(table))

    def answers(self) -> JournalIndex:
        return _index(self.earlier) if self.earlier is not None else EMPTY_INDEX

    def record(self, keys: Sequence[str], results: Sequence[Completion | GenerationFailure]
               ) -> None:
        """Journal the answers of one call (failures are not kept: a rerun asks again)."""
        done = [(k, r) for k, r in zip(keys, results, strict=True) if isinstance(r, Completion)]
        if not done:
            return
        table = to_table([k for k, _ in done], [r for _, r in done])
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


def read_journal(folder: Location) -> pa.Table:
    """Every answer journaled under `folder` (an unreadable file is skipped with a warning: its
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
            tables.append(pq.read_table(item.path, filesystem=folder.fs, schema=SCHEMA))
        except (OSError, pa.ArrowException) as error:
            log.warning("skipping unreadable journal file %s: %s", item.path, error)
    if not tables:
        return SCHEMA.empty_table()
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
