"""Input shards -> normalized row tables.

Each input file is one read task (the unit of work resume builds on), read in record batches.
Normalizing renames the user's columns to the canonical ones, checks their types, gives every
row an id and rejects rows that cannot be processed (missing instruction, too long).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from augment_ray.config import InputSpec
from augment_ray.errors import InputDataError, StorageError
from augment_ray.rows import (
    CANONICAL_TEXT,
    ID,
    INPUT_STEP,
    ORIGIN_STEP,
    REJECT_DETAIL,
    REJECT_REASON,
    REJECT_STEP,
    RESERVED,
    SOURCE_ID,
    content_ids,
)
from augment_ray.storage import Location, describe_os_error, location

EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
READ_BATCH_ROWS = 8192


def file_format(path: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    for extension, fmt in EXTENSIONS.items():
        if path.endswith(extension):
            return fmt
    return None


@dataclass(frozen=True)
class InputShard:
    path: str  # path inside the filesystem
    format: str


def list_input_shards(spec: InputSpec) -> list[InputShard]:
    """Every input file under the URI, sorted, so the same input always gives the same shards.
    Names starting with _ or . (markers, temp files) are skipped; with format: auto, so are
    files whose extension is not .parquet, .jsonl, .json or .ndjson."""
    loc = location(spec.uri, spec.storage)
    try:
        info = loc.file_info()
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"Input {spec.uri} does not exist.")
        if info.type == pafs.FileType.File:
            fmt = file_format(info.base_name, spec.format)
            if fmt is None:
                raise InputDataError(
                    f"Cannot tell the format of {spec.uri} from its name; set input.format."
                )
            return [InputShard(info.path, fmt)]
        listing = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except (StorageError, InputDataError):
        raise
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(loc, "list", error) from None
    shards = []
    for item in listing:
        if item.type != pafs.FileType.File or item.base_name.startswith(("_", ".")):
            continue
        fmt = file_format(item.base_name, spec.format)
        if fmt is not None:
            shards.append(InputShard(item.path, fmt))
    if not shards:
        wanted = spec.format if spec.format != "auto" else "parquet or jsonl"
        raise InputDataError(f"Input {spec.uri} holds no {wanted} files.")
    return sorted(shards, key=lambda shard: shard.path)


def shard_name(loc: Location, path: str) -> str:
    """The shard's path under the input URI (its file name for a single-file input): part of
    content ids, so they survive moving the dataset to another bucket or folder."""
    root = loc.path.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]


def read_shard_batches(loc: Location, shard: InputShard) -> Iterator[pa.Table]:
    try:
        if shard.format == "parquet":
            parquet = pq.ParquetFile(loc.fs.open_input_file(shard.path))
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        else:
            with loc.fs.open_input_stream(shard.path) as stream:
                table = pajson.read_json(stream)
            yield from (table.slice(i, READ_BATCH_ROWS) for i in range(0, max(len(table), 1),
                                                                        READ_BATCH_ROWS))
    except (OSError, pa.ArrowException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputDataError(
            f"Cannot read input file {_display(loc, shard.path)} as {shard.format}: {first}"
        ) from None


def _display(loc: Location, path: str) -> str:
    return path if loc.is_local else f"{loc.scheme}://{path}"


def _text_column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    column = table[name]
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        column = column.cast(kind)
    if pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.cast(pa.string())
    raise InputDataError(
        f"Column {name!r} in {where} has type {column.type}; it must hold text (string)."
    )


class ShardNormalizer:
    """Renames, type-checks and ids one shard's batches; rejects rows that cannot go on."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        columns = spec.columns
        self.mapping = {canonical: getattr(columns, canonical) for canonical in CANONICAL_TEXT}
        self.explicit = columns.model_fields_set

    def check_schema(self, schema: pa.Schema, where: str) -> None:
        names = set(schema.names)
        for canonical, source in self.mapping.items():
            required = canonical == "instruction" or canonical in self.explicit
            if source is not None and source not in names and required:
                raise InputDataError(
                    f"Input {where} has no column {source!r} (mapped to {canonical} by "
                    f"input.columns). Its columns are: {', '.join(schema.names)}."
                )
        id_column = self.spec.columns.id
        if id_column is not None and id_column not in names and "id" in self.explicit:
            raise InputDataError(
                f"Input {where} has no column {id_column!r} (input.columns.id). "
                f"Its columns are: {', '.join(schema.names)}."
            )
        mapped = {source for source in self.mapping.values() if source in names}
        mapped.add(id_column or "")
        for name in names - mapped:
            if name in RESERVED or name in CANONICAL_TEXT:
                raise InputDataError(
                    f"Input {where} has a column {name!r}, a name the pipeline uses itself; "
                    f"map it in input.columns or rename it."
                )

    def normalize(self, table: pa.Table, where: str, seen: Counter[str],
                  shard: str = "") -> pa.Table:
        self.check_schema(table.schema, where)
        texts: dict[str, pa.ChunkedArray] = {}
        for canonical, source in self.mapping.items():
            if source is not None and source in table.column_names:
                texts[canonical] = _text_column(table, source, where)
            else:
                texts[canonical] = pa.chunked_array([pa.nulls(len(table), pa.string())])
        consumed = {s for s in self.mapping.values() if s in table.column_names}
        id_source = self.spec.columns.id
        if id_source not in table.column_names:
            id_source = None
        generated = content_ids([texts[c].to_pylist() for c in CANONICAL_TEXT], seen, shard)
        if id_source is not None:
            given = table[id_source].cast(pa.string()).to_pylist()
            consumed.add(id_source)
            ids = [g if g not in (None, "") else c for g, c in zip(given, generated, strict=False)]
        else:
            ids = generated
        rest = table.drop_columns(sorted(consumed))

        instruction = texts["instruction"]
        missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(instruction), ""), True)
        lengths = pc.add(
            pc.add(pc.fill_null(pc.utf8_length(instruction), 0),
                   pc.fill_null(pc.utf8_length(texts["input"]), 0)),
            pc.fill_null(pc.utf8_length(texts["output"]), 0),
        )
        too_long = pc.greater(lengths, self.spec.max_row_chars)
        reasons: list[str | None] = []
        details: list[str | None] = []
        for is_missing, is_long, length in zip(
            missing.to_pylist(), too_long.to_pylist(), lengths.to_pylist(), strict=False
        ):
            if is_missing:
                reasons.append("missing_instruction")
                details.append("instruction is null or empty")
            elif is_long:
                reasons.append("too_long")
                details.append(f"{length} chars > input.max_row_chars {self.spec.max_row_chars}")
            else:
                reasons.append(None)
                details.append(None)
        reject_step = [INPUT_STEP if reason else None for reason in reasons]

        columns = {
            ID: pa.array(ids, pa.string()),
            **texts,
            **{name: rest[name] for name in rest.column_names},
            SOURCE_ID: pa.array(ids, pa.string()),
            ORIGIN_STEP: pa.array([INPUT_STEP] * len(table), pa.string()),
            REJECT_STEP: pa.array(reject_step, pa.string()),
            REJECT_REASON: pa.array(reasons, pa.string()),
            REJECT_DETAIL: pa.array(details, pa.string()),
        }
        return pa.table(columns)


def read_shards(batch: pa.Table, spec: InputSpec) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of shard paths in, normalized row tables out."""
    loc = location(spec.uri, spec.storage)
    normalizer = ShardNormalizer(spec)
    for path, fmt in zip(batch["path"].to_pylist(), batch["format"].to_pylist(), strict=False):
        seen: Counter[str] = Counter()
        where = _display(loc, path)
        for table in read_shard_batches(loc, InputShard(path, fmt)):
            if len(table):
                yield normalizer.normalize(table, where, seen, shard_name(loc, path))


def check_first_shard(spec: InputSpec, shard: InputShard) -> list[str]:
    """Fail before any model loads when the input's columns do not fit the job; returns the
    row columns after normalizing (empty for an empty shard)."""
    loc = location(spec.uri, spec.storage)
    normalizer = ShardNormalizer(spec)
    for table in read_shard_batches(loc, shard):
        return normalizer.normalize(table.slice(0, 1), _display(loc, shard.path),
                                    Counter()).column_names
    return []
