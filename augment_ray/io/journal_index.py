"""The replay index: where each earlier result lies, without holding the results.

Built once on the driver from the key columns only (`build_index`); what it keeps is numpy
arrays, 16 bytes per result: the key's 64-bit hash (sorted), the row group holding it and its row
there. Put in the Ray object store once, the arrays are shared zero-copy by every worker on a
node. A lookup is a `np.searchsorted`; a hit reads only the row group that holds it (a few
decoded row groups are cached per worker: a rerun asks in about the order the first attempt
answered, so consecutive calls fall in the same groups).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from augment_ray.io.journal_kinds import COMPLETIONS, JournalKind, key_hash, key_hashes

log = logging.getLogger(__name__)

CACHED_GROUPS = 4  # decoded row groups kept per worker (about 4 MB each for 1 KB answers)
READ_THREADS = 8  # object stores answer each file's read in tens of milliseconds


@dataclass(frozen=True)
class IndexData:
    """What the object store holds for one journal: per result (sorted by hash) its hash, its
    row group (an index into group_file / group_index) and its row there."""

    hashes: np.ndarray  # uint64
    groups: np.ndarray  # int32
    rows: np.ndarray  # int32
    files: tuple[str, ...]  # paths inside the journal folder's filesystem
    group_file: np.ndarray  # int32: the file of each row group
    group_index: np.ndarray  # int32: its number in that file

    def __len__(self) -> int:
        return len(self.hashes)


EMPTY_DATA = IndexData(np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                       (), np.zeros(0, np.int32), np.zeros(0, np.int32))


@dataclass
class FileKeys:
    """The key hashes of one journal file, row group by row group (None: unreadable)."""

    path: str
    groups: list[np.ndarray] | None


def read_file_keys(fs: pafs.FileSystem, path: str) -> FileKeys:
    """Only the key column is read: a million answers' keys are 32 MB, their texts a GB."""
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            return FileKeys(path, [key_hashes(parquet.read_row_group(g, columns=["key"])["key"])
                                   for g in range(parquet.num_row_groups)])
    except (OSError, pa.ArrowException, KeyError) as error:
        log.warning("skipping unreadable journal file %s: %s", path, error)
        return FileKeys(path, None)


def read_keys(fs: pafs.FileSystem, paths: Sequence[str]) -> list[FileKeys]:
    """read_file_keys of every path, in order."""
    with reader_pool(fs) as pool:
        return list(pool.map(lambda path: read_file_keys(fs, path), paths))


def reader_pool(fs: pafs.FileSystem) -> ThreadPoolExecutor:
    """Threads for reading many files: several at once on an object store (each read waits
    tens of milliseconds), one locally (more only add each thread's allocator arenas)."""
    local = isinstance(fs, pafs.LocalFileSystem)
    return ThreadPoolExecutor(max_workers=1 if local else READ_THREADS)


def build_index(files: Iterable[FileKeys]) -> IndexData:
    """The index over `files` (unreadable ones left out); a key in several files is found in the
    first (copies of one answer: a compaction that died before deleting what it compacted)."""
    readable = [f for f in files if f.groups is not None]
    hashes, groups, rows = [], [], []
    group_file: list[int] = []
    group_index: list[int] = []
    for number, keys in enumerate(readable):
        for index, group in enumerate(keys.groups or []):
            hashes.append(group)
            groups.append(np.full(len(group), len(group_file), np.int32))
            rows.append(np.arange(len(group), dtype=np.int32))
            group_file.append(number)
            group_index.append(index)
    if not hashes:
        return EMPTY_DATA
    all_hashes = np.concatenate(hashes)
    order = np.argsort(all_hashes, kind="stable")
    sorted_hashes = all_hashes[order]
    first = np.ones(len(order), bool)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    keep = order[first]
    return IndexData(sorted_hashes[first], np.concatenate(groups)[keep],
                     np.concatenate(rows)[keep], tuple(f.path for f in readable),
                     np.asarray(group_file, np.int32), np.asarray(group_index, np.int32))


@dataclass
class JournalIndex:
    """Earlier results by key, read from the journal's files on demand. `key in index` needs
    no read; values are decoded on lookup (one decode per call of get_many)."""

    data: IndexData
    kind: JournalKind = COMPLETIONS
    fs: pafs.FileSystem | None = None
    cache: OrderedDict[int, pa.Table | None] = field(default_factory=OrderedDict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or not len(self.data):
            return False
        return self._position(key_hash(key)) >= 0

    def _position(self, value: int) -> int:
        hashes = self.data.hashes
        at = int(np.searchsorted(hashes, np.uint64(value)))
        return at if at < len(hashes) and int(hashes[at]) == value else -1

    def positions(self, keys: Sequence[str]) -> np.ndarray:
        """Where each key is in the index arrays, -1 where it is not."""
        hashes = self.data.hashes
        if not len(hashes) or not keys:
            return np.full(len(keys), -1, np.int64)
        wanted = key_hashes(keys)
        at = np.minimum(np.searchsorted(hashes, wanted), len(hashes) - 1)
        return np.where(hashes[at] == wanted, at, -1)

    def get(self, key: str) -> Any:
        return self.get_many([key])[0]

    def __getitem__(self, key: str) -> Any:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        """The value of each key, None where none was journaled (or its file cannot be read)."""
        found: list[Any] = [None] * len(keys)
        where = self.positions(keys)
        hits = np.flatnonzero(where >= 0)
        if not len(hits):
            return found
        groups = self.data.groups[where[hits]]
        rows = self.data.rows[where[hits]]
        parts, slots = [], []
        for group in np.unique(groups):
            table = self._group(int(group))
            if table is None:
                continue
            mine = np.flatnonzero(groups == group)
            part = table.take(pa.array(rows[mine]))
            # a 64-bit hash shared by two keys: the full key tells them apart
            same = np.asarray(part["key"].to_pylist(), object) == np.asarray(
                [keys[i] for i in hits[mine]], object)
            parts.append(part.filter(pa.array(same)))
            slots.extend(int(i) for i in hits[mine][same])
        if slots:
            values = self.kind.decode(pa.concat_tables(parts))
            for slot, value in zip(slots, values, strict=True):
                found[slot] = value
        return found

    def _group(self, group: int) -> pa.Table | None:
        """One row group, decoded (None: its file could not be read; those keys are asked
        again)."""
        with self.lock:
            if group in self.cache:
                self.cache.move_to_end(group)
                return self.cache[group]
        path = self.data.files[int(self.data.group_file[group])]
        table: pa.Table | None = None
        try:
            if self.fs is None:
                raise OSError("the journal index has no filesystem")
            with self.fs.open_input_file(path) as handle:
                table = pq.ParquetFile(handle, pre_buffer=False).read_row_group(
                    int(self.data.group_index[group]), columns=self.kind.schema.names)
        except (OSError, pa.ArrowException, KeyError) as error:
            log.warning("cannot read journal file %s (its answers are asked again): %s",
                        path, error)
        with self.lock:
            self.cache[group] = table
            while len(self.cache) > CACHED_GROUPS:
                self.cache.popitem(last=False)
        return table
