"""A finished run's data/ -> JSONL training examples for fine-tuning frameworks.

Formats (one JSON object per line, UTF-8, non-ASCII kept as is):
    alpaca           {"instruction", "input", "output"[, "system"]}: LLaMA-Factory's alpaca loader
    sharegpt         {"conversations": [{"from", "value"}, ...]}: LLaMA-Factory sharegpt, default
                     tags (system?, human, gpt)
    openai-messages  {"messages": [{"role", "content"}, ...]}: TRL's SFTTrainer (conversational)
                     and the OpenAI fine-tuning API (system?, user, assistant)

Only committed runs are read (`_SUCCESS` present) and only the shards `_manifest.json` lists under
data/; `_rejects/` is never exported. Shards are streamed batch by batch, so memory stays flat
whatever the run's size. Rows without a response (null/blank output) or without an instruction
cannot be training examples: they are skipped and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from augment_ray.errors import InputDataError, StorageError
from augment_ray.io.committed import MANIFEST, committed_files, read_json, require_committed
from augment_ray.storage import Location, describe_os_error

INSTRUCTION = "instruction"
INPUT = "input"
OUTPUT = "output"
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Example:
    """The text of one training example, taken from one output row."""

    instruction: str
    input: str  # "" when the row has none
    output: str
    system: str | None = None


def _prompt(example: Example) -> str:
    """The user turn of a chat format: the instruction, then the input (if any) after a blank
    line."""
    if example.input:
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


def alpaca(example: Example) -> dict[str, Any]:
    record: dict[str, Any] = {
        "instruction": example.instruction,
        "input": example.input,
        "output": example.output,
    }
    if example.system is not None:
        record["system"] = example.system
    return record


def sharegpt(example: Example) -> dict[str, Any]:
    turns = [] if example.system is None else [{"from": "system", "value": example.system}]
    turns.append({"from": "human", "value": _prompt(example)})
    turns.append({"from": "gpt", "value": example.output})
    return {"conversations": turns}


def openai_messages(example: Example) -> dict[str, Any]:
    messages = [] if example.system is None else [{"role": "system", "content": example.system}]
    messages.append({"role": "user", "content": _prompt(example)})
    messages.append({"role": "assistant", "content": example.output})
    return {"messages": messages}


FORMATS: dict[str, Callable[[Example], dict[str, Any]]] = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "openai-messages": openai_messages,
}


@dataclass
class ExportStats:
    written: int = 0
    skipped_no_response: int = 0
    skipped_no_instruction: int = 0


def data_files(output: Location) -> list[Location]:
    """The data shards of the finished run at `output`, as its manifest lists them."""
    require_committed(output, "export")
    return committed_files(output, read_json(output, MANIFEST), "files")


def _columns(shard: Location, schema: pa.Schema, instruction_column: str) -> list[str]:
    """The columns to read from one shard: the instruction column must be there; input and
    output may be absent (read as null)."""
    if instruction_column not in schema.names:
        raise InputDataError(
            f"{shard.uri} has no column {instruction_column!r} (columns: "
            f"{', '.join(schema.names)}); pass --instruction-column with one of them."
        )
    return [instruction_column, *(name for name in (INPUT, OUTPUT) if name in schema.names)]


def read_rows(
    shards: list[Location], instruction_column: str = INSTRUCTION
) -> Iterator[dict[str, Any]]:
    """Rows {"instruction", "input", "output"} (values may be None), shard by shard and batch by
    batch; "instruction" comes from `instruction_column`."""
    for shard in shards:
        try:
            with shard.fs.open_input_file(shard.path) as handle:
                parquet = pq.ParquetFile(handle)
                columns = _columns(shard, parquet.schema_arrow, instruction_column)
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    instructions = batch.column(instruction_column).to_pylist()
                    inputs = (batch.column(INPUT).to_pylist() if INPUT in columns
                              else [None] * batch.num_rows)
                    outputs = (batch.column(OUTPUT).to_pylist() if OUTPUT in columns
                               else [None] * batch.num_rows)
                    for row in zip(instructions, inputs, outputs, strict=True):
                        yield dict(zip((INSTRUCTION, INPUT, OUTPUT), row, strict=True))
        except (OSError, pa.ArrowException) as error:
            raise describe_os_error(shard, "read", error) from None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def to_example(row: dict[str, Any], system: str | None) -> Example | None:
    """The training example a row makes, or None when it has no instruction or no response."""
    instruction, output = _text(row[INSTRUCTION]), _text(row[OUTPUT])
    if not instruction.strip() or not output.strip():
        return None
    return Example(instruction, _text(row[INPUT]), output, system)


def write_jsonl(records: Iterator[dict[str, Any]], path: Path, force: bool) -> int:
    """Write `records` as JSON lines to `path` (parents created); refuses an existing file
    unless `force`. Writes to a temporary file first, so a failed export leaves no half file."""
    if path.is_dir():
        raise StorageError(f"{path} is a directory; --to names the JSONL file to write.")
    if path.exists() and not force:
        raise StorageError(f"{path} already exists; pass --force to overwrite it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"Cannot create {path.parent}: {error}.") from None
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(partial, path)
    except OSError as error:
        raise StorageError(f"Cannot write {path}: {error}.") from None
    finally:
        partial.unlink(missing_ok=True)
    return count


def export(
    output: Location,
    fmt: str,
    to: Path,
    *,
    system: str | None = None,
    instruction_column: str = INSTRUCTION,
    force: bool = False,
) -> ExportStats:
    """Export the finished run at `output` to `to` as JSONL in format `fmt` (a FORMATS key)."""
    build = FORMATS[fmt]
    stats = ExportStats()
    shards = data_files(output)  # before touching `to`: a bad run leaves no file behind

    def records() -> Iterator[dict[str, Any]]:
        for row in read_rows(shards, instruction_column):
            example = to_example(row, system)
            if example is not None:
                yield build(example)
            elif not _text(row[INSTRUCTION]).strip():
                stats.skipped_no_instruction += 1
            else:
                stats.skipped_no_response += 1

    stats.written = write_jsonl(records(), to, force)
    return stats
