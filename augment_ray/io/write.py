"""Rows -> output shards: kept rows to data/, rejected rows to _rejects/, then a commit.

Output layout under the output URI:
    data/part-<task:05d>-<n:04d>.parquet      rows that passed every step
    _rejects/part-<task:05d>-<n:04d>.parquet  rejected rows, with reject_step/_reason/_detail
    _manifest.json                            files, rows per file, schema of data/, versions
    _summary.json                             the run summary
    _SUCCESS                                  written last: the run is complete and committed
    _staging/                                 where write tasks put shards until the commit
                                              moves them into data/ and _rejects/

Shard names do not depend on the run (no run id or timestamp in them): <task> is the write
task's index and <n> numbers the files that task wrote (one per max_rows_per_file rows), so the
same job over the same input names its files the same way on every run. That is safe because the
output folder is always empty when a run starts (prepare_output refuses or clears it). Files are
Parquet, zstd-compressed; any Parquet reader (Ray Data, pyarrow, pandas, DuckDB, Hugging Face
datasets) reads data/ as one table.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from augment_ray.errors import StorageError
from augment_ray.io.committed import MANIFEST, SUCCESS, SUMMARY
from augment_ray.io.lease_stores import LEASE
from augment_ray.rows import ORIGIN_STEP, REJECT_COLUMNS, REJECT_REASON, REJECT_STEP
from augment_ray.storage import Location, describe_os_error, redact_uri

FORMAT = "parquet"
COMPRESSION = "zstd"
DATA_DIR = "data"
REJECTS_DIR = "_rejects"
STAGING_DIR = "_staging"  # where a run writes; commit moves the files to data/ and _rejects/


@dataclass
class WriteStats:
    """What one write task saw; summed over tasks into the run's accounting."""

    files: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)
    rows_per_file: dict[str, int] = field(default_factory=dict)  # data and rejects files
    rows_out: int = 0
    rows_rejected: int = 0
    origin: Counter[str] = field(default_factory=Counter)  # rows created per step
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (step, reason)
    sums: Counter[str] = field(default_factory=Counter)  # token columns summed

    def add(self, other: WriteStats) -> None:
        self.files += other.files
        self.reject_files += other.reject_files
        self.rows_per_file.update(other.rows_per_file)
        self.rows_out += other.rows_out
        self.rows_rejected += other.rows_rejected
        self.origin.update(other.origin)
        self.rejected.update(other.rejected)
        self.sums.update(other.sums)


def _count(table: pa.Table, columns: list[str]) -> Counter:
    counts: Counter = Counter()
    if not len(table):
        return counts
    grouped = table.group_by(columns).aggregate([([], "count_all")]).to_pylist()
    for row in grouped:
        key = tuple(row[c] for c in columns)
        counts[key if len(key) > 1 else key[0]] += row["count_all"]
    return counts


def _token_sums(table: pa.Table) -> Counter[str]:
    sums: Counter[str] = Counter()
    for name in table.column_names:
        if name.endswith(("_prompt_tokens", "_completion_tokens")):
            sums[name] += int(pc.sum(table[name]).as_py() or 0)
    return sums


def code_version() -> dict[str, str]:
    """The versions that wrote an output, for its manifest."""
    try:
        own = importlib.metadata.version("augment-ray")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        own = "unknown"
    return {"augment_ray": own, "ray": ray.__version__, "pyarrow": pa.__version__}


def shard_name(task: int, n: int) -> str:
    """The name of a write task's n-th file: the same on every run of the same job."""
    return f"part-{task:05d}-{n:04d}.{FORMAT}"


class RoutingParquetSink(Datasink[WriteStats]):
    """Writes each block's kept and rejected rows to their own Parquet files in one pass."""

    format = FORMAT
    compression = COMPRESSION

    def __init__(self, output: Location, max_rows_per_file: int) -> None:
        self.output = output
        self.max_rows_per_file = max_rows_per_file
        self.result = WriteStats()

    def get_name(self) -> str:
        return "RoutingParquet"

    def _write(
        self, table: pa.Table, folder: str, task: int, files: list[str], rows: dict[str, int],
    ) -> None:
        fs = self.output.fs
        for start in range(0, len(table), self.max_rows_per_file):
            name = shard_name(task, len(files))
            part = table.slice(start, self.max_rows_per_file)
            target = self.output.join(folder, name)
            try:
                pq.write_table(part, target.path, filesystem=fs, compression=self.compression)
            except (OSError, pa.ArrowException) as error:
                raise describe_os_error(target, "write", error) from None
            files.append(f"{folder}/{name}")
            rows[f"{folder}/{name}"] = len(part)

    def write(self, blocks: Iterable[Block], ctx) -> WriteStats:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if len(t)]
        stats = WriteStats()
        if not tables:
            return stats
        table = pa.concat_tables(tables, promote_options="permissive")
        rejected_mask = pc.is_valid(table[REJECT_STEP])
        kept = table.filter(pc.invert(rejected_mask)).drop_columns(list(REJECT_COLUMNS))
        rejected = table.filter(rejected_mask)
        self._write(kept, DATA_DIR, ctx.task_idx, stats.files, stats.rows_per_file)
        self._write(rejected, REJECTS_DIR, ctx.task_idx, stats.reject_files, stats.rows_per_file)
        stats.rows_out = len(kept)
        stats.rows_rejected = len(rejected)
        stats.origin = _count(table.select([ORIGIN_STEP]), [ORIGIN_STEP])
        stats.rejected = _count(rejected.select([REJECT_STEP, REJECT_REASON]),
                                [REJECT_STEP, REJECT_REASON])
        stats.sums = _token_sums(table)
        return stats

    def on_write_complete(self, write_result: WriteResult[WriteStats]) -> None:
        for stats in write_result.write_returns:
            self.result.add(stats)


def create_output_folder(output: Location) -> None:
    """The output folder, before its lease is taken in it: a clear error when it is a file or
    cannot be made (object stores have no folders: nothing to do there)."""
    try:
        if output.file_info().type == pafs.FileType.File:
            raise StorageError(f"Output {output.uri} is a file; it must be a folder or prefix.")
        if output.is_local:
            output.fs.create_dir(output.path, recursive=True)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(output, "create the output folder", error) from None


def prepare_output(output: Location, mode: str, keep: tuple[str, ...] = ()) -> None:
    """Apply the write mode before any work starts: refuse or clear an existing output (except
    the entries named in `keep`, e.g. the journal of an attempt being resumed)."""
    try:
        info = output.file_info()
        if info.type == pafs.FileType.File:
            raise StorageError(f"Output {output.uri} is a file; it must be a folder or prefix.")
        entries = output.fs.get_file_info(pafs.FileSelector(output.path, recursive=False)) \
            if info.type == pafs.FileType.Directory else []
        # the lease (and its lock) is this run's, taken before the output is prepared
        entries = [entry for entry in entries if not entry.base_name.startswith(LEASE)]
        if entries and mode == "error-if-exists":
            raise StorageError(
                f"Output {output.uri} already holds files. Choose another output.uri, or set "
                "output.mode: overwrite (or pass --overwrite) to replace them."
            )
        for entry in entries:
            if entry.base_name in keep:
                continue
            if entry.type == pafs.FileType.Directory:
                output.fs.delete_dir(entry.path)
            else:
                output.fs.delete_file(entry.path)
        staging = output.join(STAGING_DIR)
        output.fs.create_dir(staging.join(DATA_DIR).path, recursive=True)
        output.fs.create_dir(staging.join(REJECTS_DIR).path, recursive=True)
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(output, "prepare output", error) from None


def write_json(loc: Location, name: str, payload: dict) -> None:
    data = json.dumps(payload, indent=2, sort_keys=False, default=str).encode("utf-8")
    target = loc.join(name)
    try:
        with loc.fs.open_output_stream(target.path) as stream:
            stream.write(data)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(target, "write", error) from None


def write_marked(loc: Location, files: dict[str, dict], marker: str, stamp: dict) -> None:
    """The commit protocol's last part: the JSON `files`, then the `marker` file last, so a
    reader that sees the marker (a run's _SUCCESS, a loop round's _DONE) sees them all."""
    for name, payload in files.items():
        write_json(loc, name, payload)
    write_json(loc, marker, stamp)


def move_staged(source: Location, target: Location) -> None:
    """One staged file into place (on S3 a copy, then a delete of the source)."""
    try:
        source.fs.move(source.path, target.path)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(source, "move", error,
                                after=f" to {redact_uri(target.uri)} (the commit)") from None


def commit(output: Location, manifest: dict, summary: dict,
           remove_after: tuple[str, ...] = ()) -> None:
    """Move the staged files into data/ and _rejects/, write manifest and summary, then the
    success marker last: readers trust only _SUCCESS. `remove_after` (the journal) goes once
    the run is committed."""
    staging = output.join(STAGING_DIR)
    try:
        for folder in (DATA_DIR, REJECTS_DIR):
            output.fs.create_dir(output.join(folder).path, recursive=True)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(output, "create data/ and _rejects/ (the commit) in", error) \
            from None
    for name in [*manifest["files"], *manifest["reject_files"]]:
        move_staged(staging.join(name), output.join(name))
    write_marked(output, {MANIFEST: manifest, SUMMARY: summary}, SUCCESS,
                 {"run_id": manifest["run_id"]})
    for name in (STAGING_DIR, *remove_after):
        # absent (nothing journaled) or already gone: nothing to clean
        with contextlib.suppress(OSError, pa.ArrowException):
            output.fs.delete_dir(output.join(name).path)
