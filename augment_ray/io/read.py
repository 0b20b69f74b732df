"""Input shards -> normalized row tables.

Each input file is one read task (the unit of work resume builds on), read in record batches.
Normalizing renames the user's columns to the canonical ones, checks their types, gives every
row an id and rejects rows that cannot be processed (missing instruction, too long, text that is
not UTF-8, a conversation that is not one). A JSONL line that is not valid UTF-8 becomes a
rejected row (`unreadable_line`), so one bad line does not fail its file; a file that cannot be
parsed at all is an InputDataError. A Hugging Face datasets folder gives one shard per .arrow
file (io/hf_folders.py); a conversation column becomes `messages` (io/conversation_input.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from augment_ray.config.io import InputSpec
from augment_ray.conversations import MESSAGES, conversation_array
from augment_ray.errors import InputDataError, StorageError
from augment_ray.io.conversation_input import (
    ConversationColumn,
    check_no_text_columns,
    conversation_column,
    parse_conversations,
)
from augment_ray.io.hf_folders import hf_shard_paths, read_arrow_stream
from augment_ray.io.jsonl import UnreadableLine, read_jsonl
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
    files whose extension is not .parquet, .jsonl, .json or .ndjson. A Hugging Face datasets
    folder (format: hf, or auto and the folder holds state.json or dataset_dict.json) gives
    its .arrow files."""
    loc = location(spec.uri, spec.storage)
    try:
        info = loc.file_info()
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"Input {spec.uri} does not exist.")
        if info.type == pafs.FileType.Directory and spec.format in ("auto", "hf"):
            paths = hf_shard_paths(loc, spec.split)
            if paths is not None:
                return [InputShard(path, "hf") for path in paths]
            if spec.format == "hf":
                raise InputDataError(
                    f"Input {spec.uri} is not a Hugging Face datasets folder: it holds neither "
                    "state.json nor dataset_dict.json (what save_to_disk writes)."
                )
        if spec.split is not None:
            raise InputDataError(
                f"input.split is set but {spec.uri} is not a Hugging Face DatasetDict folder; "
                "drop input.split."
            )
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
        wanted = {"auto": "parquet or jsonl", "hf": ".arrow"}.get(spec.format, spec.format)
        raise InputDataError(f"Input {spec.uri} holds no {wanted} files.")
    return sorted(shards, key=lambda shard: shard.path)


def shard_name(loc: Location, path: str) -> str:
    """The shard's path under the input URI (its file name for a single-file input): part of
    content ids, so they survive moving the dataset to another bucket or folder."""
    root = loc.path.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]


def read_shard_parts(loc: Location, shard: InputShard) -> Iterator[pa.Table | list[UnreadableLine]]:
    """The shard's rows in record batches, then (JSONL only) its unreadable lines, if any."""
    try:
        if shard.format == "parquet":
            parquet = pq.ParquetFile(loc.fs.open_input_file(shard.path))
            if not parquet.metadata.num_rows:  # no batches to read: its columns, 0 rows
                yield parquet.schema_arrow.empty_table()
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        elif shard.format == "hf":
            yield from read_arrow_stream(loc, shard.path, READ_BATCH_ROWS)
        else:
            table, unreadable = read_jsonl(loc, shard.path)
            if table is not None and table.num_columns:  # blank lines only: no rows
                yield from (table.slice(i, READ_BATCH_ROWS)
                            for i in range(0, len(table), READ_BATCH_ROWS))
            if unreadable:
                yield unreadable
    except (OSError, pa.ArrowException, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputDataError(
            f"Cannot read input file {_display(loc, shard.path)} as {shard.format}: {first}"
        ) from None


def read_shard_batches(loc: Location, shard: InputShard) -> Iterator[pa.Table]:
    """The shard's rows in record batches (unreadable JSONL lines left out)."""
    for part in read_shard_parts(loc, shard):
        if isinstance(part, pa.Table):
            yield part


def _display(loc: Location, path: str) -> str:
    return path if loc.is_local else f"{loc.scheme}://{path}"


def _text_column(table: pa.Table, name: str,
                 where: str) -> tuple[pa.ChunkedArray, dict[int, bytes]]:
    """The column as strings, and the raw bytes of the rows that are not valid UTF-8 (by row;
    those rows are null in the result). Binary columns (Parquet BYTE_ARRAY without the UTF8
    annotation, as some writers leave text) are decoded as UTF-8."""
    column = table[name]
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
        column = column.cast(kind)
    if pa.types.is_null(kind):
        return column.cast(pa.string()), {}
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (textual or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise InputDataError(
            f"Column {name!r} in {where} has type {column.type}; it must hold text (string)."
        )
    try:
        if textual:
            column.validate(full=True)  # readers do not always check UTF-8
        return column.cast(pa.string()), {}  # a binary -> string cast checks UTF-8
    except pa.ArrowInvalid:
        pass
    values: list[str | None] = []
    bad: dict[int, bytes] = {}
    raw_type = pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()
    for row, raw in enumerate(column.cast(raw_type).to_pylist() if textual
                              else column.to_pylist()):
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(None)
            bad[row] = raw
    return pa.chunked_array([pa.array(values, pa.string())], pa.string()), bad


def _preview(raw: bytes, limit: int = 200) -> str:
    """The start of raw bytes as one printable line: bad bytes and control characters escaped."""
    text = raw[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if len(raw) > limit else "")


class ShardNormalizer:
    """Renames, type-checks and ids one shard's batches; rejects rows that cannot go on."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        columns = spec.columns
        self.mapping = {canonical: getattr(columns, canonical) for canonical in CANONICAL_TEXT}
        self.explicit = columns.model_fields_set

    def check_schema(self, schema: pa.Schema, where: str) -> ConversationColumn | None:
        """Raises InputDataError for columns that do not fit input.columns; returns the
        conversation column, if the input has one."""
        names = set(schema.names)
        conversation = conversation_column(schema, self.spec.columns, where)
        if conversation is not None:
            check_no_text_columns(schema, self.mapping, conversation, where)
        for canonical, source in self.mapping.items():
            required = conversation is None and (canonical == "instruction"
                                                 or canonical in self.explicit)
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
        mapped.add(conversation.source if conversation else "")
        for name in names - mapped:
            if name in RESERVED or name in CANONICAL_TEXT or name == MESSAGES:
                raise InputDataError(
                    f"Input {where} has a column {name!r}, a name the pipeline uses itself; "
                    f"map it in input.columns or rename it."
                )
        return conversation

    def normalize(self, table: pa.Table, where: str, seen: Counter[str],
                  shard: str = "") -> pa.Table:
        conversation = self.check_schema(table.schema, where)
        texts: dict[str, pa.ChunkedArray] = {}
        not_utf8: dict[int, str] = {}  # row -> reject detail
        for canonical, source in self.mapping.items():
            if source is not None and source in table.column_names:
                texts[canonical], bad = _text_column(table, source, where)
                for row, raw in bad.items():
                    not_utf8.setdefault(
                        row, f"column {source!r} ({canonical}) is not valid UTF-8: {_preview(raw)}"
                    )
            else:
                texts[canonical] = pa.chunked_array([pa.nulls(len(table), pa.string())])
        consumed = {s for s in self.mapping.values() if s in table.column_names}
        extra: dict[str, pa.Array] = {}  # the messages column, after the text columns
        failures: dict[int, tuple[str, str]] = {}  # row -> bad conversation's reason, detail
        turn_ids: list[list[str]] = []
        conversation_lengths: pa.Array | None = None
        if conversation is not None:
            parsed = parse_conversations(table, conversation)
            texts["instruction"] = pa.chunked_array([parsed.instructions])
            texts["output"] = pa.chunked_array([parsed.outputs])
            extra[MESSAGES] = conversation_array(parsed.turns)
            failures = parsed.failures
            consumed.add(conversation.source)
            turn_ids = [parsed.id_values]  # conversations may differ past the first turn
            conversation_lengths = pa.array(parsed.lengths, pa.int64())
        id_values = [texts[c].to_pylist() for c in CANONICAL_TEXT] + turn_ids
        id_source = self.spec.columns.id
        if id_source not in table.column_names:
            id_source = None
        generated = content_ids(id_values, seen, shard)
        if id_source is not None:
            given = _id_strings(table[id_source], id_source, where).to_pylist()
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
        ) if conversation_lengths is None else conversation_lengths
        too_long = pc.greater(lengths, self.spec.max_row_chars)
        reasons: list[str | None] = []
        details: list[str | None] = []
        for row, (is_missing, is_long, length) in enumerate(zip(
            missing.to_pylist(), too_long.to_pylist(), lengths.to_pylist(), strict=False
        )):
            if row in not_utf8:
                reasons.append("invalid_utf8")
                details.append(not_utf8[row])
            elif row in failures:
                reasons.append(failures[row][0])
                details.append(failures[row][1])
            elif is_missing:
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
            **extra,
            **{name: rest[name] for name in rest.column_names},
            SOURCE_ID: pa.array(ids, pa.string()),
            ORIGIN_STEP: pa.array([INPUT_STEP] * len(table), pa.string()),
            REJECT_STEP: pa.array(reject_step, pa.string()),
            REJECT_REASON: pa.array(reasons, pa.string()),
            REJECT_DETAIL: pa.array(details, pa.string()),
        }
        return pa.table(columns)

    def unreadable(self, lines: list[UnreadableLine], seen: Counter[str] | None = None,
                   shard: str = "") -> pa.Table:
        """Rejected rows for JSONL lines that are not UTF-8: an id from the raw bytes (as the
        line's only value, so it never equals a parsed row's id), null text columns."""
        ids = content_ids([[line.raw.decode("utf-8", "backslashreplace") for line in lines]],
                          Counter() if seen is None else seen, shard)
        n = len(lines)
        nulls = pa.nulls(n, pa.string())
        return pa.table({
            ID: pa.array(ids, pa.string()),
            **{canonical: nulls for canonical in CANONICAL_TEXT},
            SOURCE_ID: pa.array(ids, pa.string()),
            ORIGIN_STEP: pa.array([INPUT_STEP] * n, pa.string()),
            REJECT_STEP: pa.array([INPUT_STEP] * n, pa.string()),
            REJECT_REASON: pa.array(["unreadable_line"] * n, pa.string()),
            REJECT_DETAIL: pa.array(
                [f"line {line.number} is not valid UTF-8 ({line.problem}): {_preview(line.raw)}"
                 for line in lines], pa.string()),
        })


def _id_strings(column: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputDataError(
            f"Column {name!r} (the row id) in {where} has type {column.type} or values that are "
            "not UTF-8; ids must be text or integers."
        ) from None


def read_shards(batch: pa.Table, spec: InputSpec) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of shard paths in, normalized row tables out."""
    loc = location(spec.uri, spec.storage)
    normalizer = ShardNormalizer(spec)
    for path, fmt in zip(batch["path"].to_pylist(), batch["format"].to_pylist(), strict=False):
        seen: Counter[str] = Counter()
        where = _display(loc, path)
        name = shard_name(loc, path)
        pending: pa.Table | None = None  # held back so unreadable lines can join it
        columns_only: pa.Table | None = None  # a file with columns but no rows
        rows = 0
        for part in read_shard_parts(loc, InputShard(path, fmt)):
            if isinstance(part, pa.Table):
                if not len(part):
                    columns_only = part
                    continue
                if pending is not None:
                    yield pending
                pending = normalizer.normalize(part, where, seen, name)
                rows += len(part)
            else:
                rejected = normalizer.unreadable(part, seen, name)
                pending = rejected if pending is None else pa.concat_tables(
                    [pending, rejected], promote_options="default")
                rows += len(part)
        if pending is not None:
            yield pending
        elif not rows:
            # an empty file still gives its (0-row) block the row columns, so that steps
            # looking for a column find it; a Parquet file's own columns are checked as usual
            yield (normalizer.normalize(columns_only, where, seen, name)
                   if columns_only is not None else normalizer.unreadable([]))


def check_first_shard(spec: InputSpec, shard: InputShard) -> list[str]:
    """Fail before any model loads when the input's columns do not fit the job; returns the
    row columns after normalizing (a 0-row Parquet file still has its columns; empty for an
    empty JSONL file)."""
    loc = location(spec.uri, spec.storage)
    normalizer = ShardNormalizer(spec)
    for table in read_shard_batches(loc, shard):
        return normalizer.normalize(table.slice(0, 1), _display(loc, shard.path),
                                    Counter()).column_names
    return []


def first_shard_schema(spec: InputSpec) -> pa.Schema | None:
    """The columns of the input's first file as stored (before input.columns maps them), from
    its first batch; None for an empty JSONL file. Steps decide from it before the run, as the
    reader's own column check does."""
    shard = list_input_shards(spec)[0]
    for table in read_shard_batches(location(spec.uri, spec.storage), shard):
        return table.schema
    return None


def input_has_conversations(spec: InputSpec) -> bool:
    """Whether the input's rows are conversations (its first file has a conversation column)."""
    schema = first_shard_schema(spec)
    return schema is not None and conversation_column(schema, spec.columns, spec.uri) is not None


def check_given_ids_unique(spec: InputSpec, shards: list[InputShard]) -> None:
    """With input.columns.id set explicitly, every given id must be unique across the input
    (dedup keeps the lowest id, resume and lineage join on it): reads only the id column of
    every shard and raises InputDataError naming a repeated id and its files. Null and empty
    ids are left out: those rows get content ids."""
    column = spec.columns.id
    if column is None or "id" not in spec.columns.model_fields_set:
        return
    loc = location(spec.uri, spec.storage)
    parts = []
    for index, shard in enumerate(shards):
        where = _display(loc, shard.path)
        for ids in _given_id_batches(loc, shard, column, where):
            ids = ids.filter(pc.fill_null(pc.not_equal(ids, ""), False))
            if len(ids):
                parts.append(pa.table({
                    "id": ids, "file": pa.array([index] * len(ids), pa.int32()),
                }))
    if not parts:
        return
    per_file = pa.concat_tables(parts).group_by(["id", "file"]).aggregate([("file", "count")])
    totals = per_file.group_by("id").aggregate([("file_count", "sum")])
    repeated = totals.filter(pc.greater(totals["file_count_sum"], 1))
    if not len(repeated):
        return
    example = pc.min(repeated["id"]).as_py()
    rows = pc.sum(repeated["file_count_sum"]).as_py()
    where_example = per_file.filter(pc.equal(per_file["id"], example)).sort_by("file")
    places = [
        f"{shard_name(loc, shards[file].path)} ({count} row{'s' if count > 1 else ''})"
        for file, count in zip(where_example["file"].to_pylist(),
                               where_example["file_count"].to_pylist(), strict=False)
    ]
    listed = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    many = len(repeated) > 1
    raise InputDataError(
        f"The ids in column {column!r} (input.columns.id) of {spec.uri} must be unique, but "
        f"{len(repeated)} id{'s repeat' if many else ' repeats'} ({rows} rows carry "
        f"{'them' if many else 'it'}); e.g. id {example!r} is in {listed}. Make the ids "
        "unique, or drop input.columns.id so that content ids are generated."
    )


def _given_id_batches(loc: Location, shard: InputShard, column: str,
                      where: str) -> Iterator[pa.ChunkedArray]:
    """The id column of one shard as strings, batch by batch (Parquet reads just that column)."""
    def missing(names: list[str]) -> InputDataError:
        return InputDataError(
            f"Input {where} has no column {column!r} (input.columns.id). "
            f"Its columns are: {', '.join(names)}."
        )

    if shard.format == "parquet":
        try:
            parquet = pq.ParquetFile(loc.fs.open_input_file(shard.path))
            names = parquet.schema_arrow.names
            if column not in names:
                raise missing(names)
            batches = parquet.iter_batches(batch_size=READ_BATCH_ROWS * 8, columns=[column])
            tables = (pa.Table.from_batches([batch]) for batch in batches)
            for table in tables:
                yield _id_strings(table[column], column, where)
        except (OSError, pa.ArrowException) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else \
                type(error).__name__
            raise InputDataError(
                f"Cannot read input file {where} as parquet: {first}"
            ) from None
        return
    for table in read_shard_batches(loc, shard):
        if column not in table.column_names:
            raise missing(table.column_names)
        yield _id_strings(table[column], column, where)
