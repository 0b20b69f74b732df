"""Compaction: an earlier attempt's thousands of one-call journal files folded into one.

A million answers at 128 per call are ~8,000 files; a rerun would otherwise list and open every
one in every lookup path. `compact` writes the small files' answers into one
compacted-<time>-<id>.parquet (row groups of ROW_GROUP_ROWS, in the order the answers were
journaled, so a rerun's consecutive calls fall in the same row groups), and only once that file
is whole deletes the files it replaces: a crash in between leaves copies, never a gap, and the
next compaction drops the copies (an answer already in a compacted file is not written again).
The driver holds one window of small files at a time, never the whole journal.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from augment_ray.io.journal_index import FileKeys, read_keys, reader_pool
from augment_ray.io.journal_kinds import JournalKind, key_hashes
from augment_ray.storage import Location, describe_os_error

log = logging.getLogger(__name__)

COMPACTED = "compacted-"
ROW_GROUP_ROWS = 4096  # ~4 MB of 1 KB answers: what a lookup decodes, and caches, at once
WINDOW_FILES = 64  # small files read at once while compacting


@dataclass
class JournalFiles:
    """A journal folder's files by role: compacted (oldest first), earlier attempts' small
    files (in the order they were written) and the running attempt's own."""

    compacted: list[str]
    earlier: list[str]
    current: list[str]


def list_journal(folder: Location, run_id: str) -> JournalFiles:
    try:
        listing = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(folder, "list", error) from None
    files = [i for i in listing if i.type == pafs.FileType.File and
             i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))]
    compacted = sorted(i.path for i in files if i.base_name.startswith(COMPACTED))
    current = sorted(i.path for i in files if i.base_name.startswith(f"{run_id}-"))
    earlier = [i for i in files if not i.base_name.startswith((COMPACTED, f"{run_id}-"))]
    earlier.sort(key=lambda i: (i.mtime_ns or 0, i.path))
    return JournalFiles(compacted, [i.path for i in earlier], current)


def first_copies(files: Sequence[FileKeys], known: np.ndarray) -> list[np.ndarray | None]:
    """Per file, which of its rows to keep: the first copy of each key that is not in `known`
    (sorted hashes of what compacted files already hold)."""
    readable = [f.groups for f in files if f.groups is not None]
    flat = [np.concatenate(g) if g else np.zeros(0, np.uint64) for g in readable]
    every = np.concatenate(flat) if flat else np.zeros(0, np.uint64)
    keep = np.zeros(len(every), bool)
    keep[np.unique(every, return_index=True)[1]] = True
    if len(known):
        keep &= ~np.isin(every, known)
    masks: list[np.ndarray | None] = []
    start = 0
    for f in files:
        if f.groups is None:
            masks.append(None)
            continue
        size = sum(len(g) for g in f.groups)
        masks.append(keep[start:start + size])
        start += size
    return masks


class CompactedWriter:
    """One compacted file, written in whole row groups; its key hashes kept per group."""

    def __init__(self, folder: Location, kind: JournalKind) -> None:
        self.folder = folder
        self.kind = kind
        self.name = f"{COMPACTED}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        self.path = f"{folder.path}/{self.name}"
        # locally write-then-rename; an object store shows an object whole on close or never
        self.writing = f"{folder.path}/.tmp-{self.name}" if folder.is_local else self.path
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.groups: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += len(table)
        while self.pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        group, rest = table.slice(0, rows), table.slice(rows)
        if self.writer is None:
            if self.folder.is_local:
                self.folder.fs.create_dir(self.folder.path, recursive=True)
            self.writer = pq.ParquetWriter(self.writing, self.kind.schema,
                                           filesystem=self.folder.fs)
        self.writer.write_table(group, row_group_size=rows)
        self.groups.append(key_hashes(group["key"]))
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)

    def close(self) -> FileKeys | None:
        """Finish the file (None: nothing was written)."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        if self.writer is None:
            return None
        self.writer.close()
        if self.writing != self.path:
            self.folder.fs.move(self.writing, self.path)
        return FileKeys(self.path, self.groups)


def read_small(fs: pafs.FileSystem, path: str, kind: JournalKind) -> pa.Table | None:
    try:  # ParquetFile, not read_table: the dataset reader costs the driver ~60 MB more
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).read(columns=kind.schema.names).cast(kind.schema)
    except (OSError, pa.ArrowException, ValueError, KeyError) as error:
        log.warning("skipping unreadable journal file %s: %s", path, error)
        return None


def compact(folder: Location, paths: Sequence[str], known: np.ndarray, kind: JournalKind
            ) -> FileKeys | None:
    """Fold the small files `paths` into one compacted file, then delete them; returns the
    new file's keys (None: nothing new to write). `known`: sorted hashes already compacted."""
    keys = read_keys(folder.fs, paths)
    masks = first_copies(keys, known)
    out = CompactedWriter(folder, kind)
    done: list[str] = []
    try:
        with reader_pool(folder.fs) as pool:
            for start in range(0, len(paths), WINDOW_FILES):
                window = []
                for i in range(start, min(start + WINDOW_FILES, len(paths))):
                    mask = masks[i]
                    if mask is not None and not mask.any():
                        done.append(paths[i])  # only copies of compacted answers
                    elif mask is not None:
                        window.append(i)
                tables = pool.map(lambda i: read_small(folder.fs, paths[i], kind), window)
                for i, table in zip(window, tables, strict=True):
                    mask = masks[i]
                    if table is None or mask is None or len(table) != len(mask):
                        continue  # changed or unreadable since its keys were read: kept as is
                    out.add(table.filter(pa.array(mask)))
                    done.append(paths[i])
        written = out.close()
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(folder, "compact the journal in", error) from None
    remove(folder.fs, done)
    log.info("%s: compacted %d journal files into %s", folder.uri, len(done),
             written.path.rsplit("/", 1)[-1] if written else "none (all copies)")
    return written


def remove(fs: pafs.FileSystem, paths: Sequence[str]) -> None:
    """Delete compacted small files; one that stays is only a copy (the next open drops it)."""
    def delete(path: str) -> None:
        try:
            fs.delete_file(path)
        except (OSError, pa.ArrowException) as error:
            log.warning("could not delete compacted journal file %s: %s", path, error)

    with reader_pool(fs) as pool:
        list(pool.map(delete, paths))
