"""A finished run's data/ -> training examples for fine-tuning frameworks.

FORMATS is the one list of formats (the CLI's --format choices and its help come from it). Every
format takes single-turn rows and conversation rows (a `messages` column, see conversations.py)
alike, mixed in one run. JSONL formats write one JSON object per line (UTF-8, non-ASCII kept);
`hf` writes a Hugging Face `datasets` folder (export_writers.write_hf_folder).

A conversation is exported as its row's text columns now say it is
(conversations.apply_text_columns): `output` (auto_correct's corrected answer) replaces the last
assistant turn, and the column named by --instruction-column, when given, the first user turn.
Its own system turn wins over --system. A conversation whose last turn is a user turn (or that
has no assistant turn) has no response and is skipped like a single-turn row without one.

Only committed runs are read (`_SUCCESS` present) and only the shards `_manifest.json` lists under
data/; `_rejects/` is never exported. Shards are streamed batch by batch, so memory stays flat
whatever the run's size. Rows without a response (null/blank output) or without an instruction
cannot be training examples: they are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from augment_ray import conversations as conv
from augment_ray.errors import InputDataError
from augment_ray.export_writers import write_hf_folder, write_jsonl
from augment_ray.io.committed import MANIFEST, committed_files, read_json, require_committed
from augment_ray.storage import Location, describe_os_error

INSTRUCTION = "instruction"
INPUT = "input"
OUTPUT = "output"
MESSAGES = conv.MESSAGES
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Example:
    """The text of one training example, taken from one output row. A conversation's last
    exchange is `instruction` (its last user turn, `input` "") and `output`; the exchanges
    before it are `history`."""

    instruction: str
    input: str  # "" when the row has none
    output: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()


def _prompt(example: Example) -> str:
    """The last user turn of a chat format: the instruction, then the input (if any) after a
    blank line."""
    if example.input:
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


def chat_turns(example: Example) -> list[conv.Turn]:
    """The example as canonical turns: system (if any), then user and assistant in turn."""
    turns = [] if example.system is None else [{"role": "system", "content": example.system}]
    for user, assistant in example.history:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    turns += [{"role": "user", "content": _prompt(example)},
              {"role": "assistant", "content": example.output}]
    return turns


# Builders take the example and whether the run has conversations: a JSONL loader (Hugging Face
# `datasets`, so LLaMA-Factory) fixes a file's columns from its first block, so a key some rows
# have must be on every row of the file.

def alpaca(example: Example, conversations: bool = False) -> dict[str, Any]:
    record: dict[str, Any] = {
        "instruction": example.instruction,
        "input": example.input,
        "output": example.output,
    }
    if example.system is not None or conversations:
        record["system"] = example.system or ""
    if conversations:
        record["history"] = [list(pair) for pair in example.history]
    return record


def sharegpt(example: Example, conversations: bool = False) -> dict[str, Any]:
    return {"conversations": [{"from": conv.SHAREGPT_TAGS[turn["role"]], "value": turn["content"]}
                              for turn in chat_turns(example)]}


def llama_factory(example: Example, conversations: bool = False) -> dict[str, Any]:
    # "system" on every line, "" for none: LLaMA-Factory reads the mapped column on every row
    body = [turn for turn in chat_turns(example) if turn["role"] != "system"]
    return {"conversations": [{"from": conv.SHAREGPT_TAGS[turn["role"]], "value": turn["content"]}
                              for turn in body],
            "system": example.system or ""}


def openai_messages(example: Example, conversations: bool = False) -> dict[str, Any]:
    return {"messages": chat_turns(example)}


def _has_history(record: dict[str, Any]) -> bool:
    return bool(record.get("history"))


@dataclass(frozen=True)
class Format:
    build: Callable[[Example, bool], dict[str, Any]]
    reader: str  # who reads it: the CLI's --format help
    folder: bool = False  # --to is a `datasets` folder (save_to_disk), not a JSONL file
    run_keys: bool = False  # its keys depend on whether the run has conversations
    # on a run with conversations, a record that shows a column's type (write_jsonl puts the
    # first one at the front of the file)
    types_columns: Callable[[dict[str, Any]], bool] | None = None


FORMATS: dict[str, Format] = {
    "alpaca": Format(alpaca, "LLaMA-Factory alpaca (conversations: history)", run_keys=True,
                     types_columns=_has_history),
    "sharegpt": Format(sharegpt, "LLaMA-Factory sharegpt, system as a turn"),
    "llama-factory": Format(llama_factory, "LLaMA-Factory sharegpt, system as its own key"),
    "openai-messages": Format(openai_messages, "TRL SFTTrainer, the OpenAI fine-tuning API"),
    "hf": Format(openai_messages, "a datasets.load_from_disk folder, one messages column",
                 folder=True),
}


@dataclass
class ExportStats:
    written: int = 0
    skipped_no_response: int = 0
    skipped_no_instruction: int = 0
    skipped_bad_conversation: int = 0


def data_files(output: Location) -> list[Location]:
    """The data shards of the finished run at `output`, as its manifest lists them."""
    require_committed(output, "export")
    return committed_files(output, read_json(output, MANIFEST), "files")


def _columns(shard: Location, schema: pa.Schema, instruction_column: str) -> list[str]:
    """The columns to read from one shard: the instruction column must be there; input, output
    and messages may be absent (read as null)."""
    if instruction_column not in schema.names:
        raise InputDataError(
            f"{shard.uri} has no column {instruction_column!r} (columns: "
            f"{', '.join(schema.names)}); pass --instruction-column with one of them."
        )
    return [instruction_column,
            *(name for name in (INPUT, OUTPUT, MESSAGES) if name in schema.names)]


def has_conversations(shards: list[Location]) -> bool:
    """Whether any shard has a `messages` column (Parquet footers only)."""
    for shard in shards:
        try:
            with shard.fs.open_input_file(shard.path) as handle:
                if MESSAGES in pq.read_schema(handle).names:
                    return True
        except (OSError, pa.ArrowException) as error:
            raise describe_os_error(shard, "read", error) from None
    return False


def read_rows(
    shards: list[Location], instruction_column: str = INSTRUCTION
) -> Iterator[dict[str, Any]]:
    """Rows {"instruction", "input", "output", "messages"} (values may be None), shard by shard
    and batch by batch; "instruction" comes from `instruction_column`."""
    names = (INSTRUCTION, INPUT, OUTPUT, MESSAGES)
    for shard in shards:
        try:
            with shard.fs.open_input_file(shard.path) as handle:
                parquet = pq.ParquetFile(handle)
                columns = _columns(shard, parquet.schema_arrow, instruction_column)
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    values = [
                        batch.column(column).to_pylist() if column in columns
                        else [None] * batch.num_rows
                        for column in (instruction_column, INPUT, OUTPUT, MESSAGES)
                    ]
                    for row in zip(*values, strict=True):
                        yield dict(zip(names, row, strict=True))
        except (OSError, pa.ArrowException) as error:
            raise describe_os_error(shard, "read", error) from None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class Skip(Exception):
    """Why a row makes no training example: the ExportStats counter to add one to."""

    def __init__(self, counter: str) -> None:
        super().__init__(counter)
        self.counter = counter


def _conversation_example(row: dict[str, Any], turns: list[conv.Turn], system: str | None,
                          rewritten_instruction: bool) -> Example:
    turns = conv.apply_text_columns(
        turns, row[INSTRUCTION] if rewritten_instruction else None, row[OUTPUT])
    if any(not isinstance(turn.get("content"), str) or not turn["content"].strip()
           for turn in turns):
        raise Skip("skipped_bad_conversation")
    try:
        conv.check_order(turns)
    except conv.BadConversation:
        raise Skip("skipped_bad_conversation") from None
    if turns[-1]["role"] != "assistant":  # unanswered, or user turns only
        raise Skip("skipped_no_response")
    own = conv.system_prompt(turns)
    pairs = conv.exchanges(turns)
    instruction, output = pairs[-1]
    return Example(instruction, "", output or "", own if own is not None else system,
                   tuple((user, answer or "") for user, answer in pairs[:-1]))


def to_example(row: dict[str, Any], system: str | None,
               rewritten_instruction: bool = False) -> Example:
    """The training example a row makes; raises Skip when it makes none. `rewritten_instruction`:
    the row's instruction came from --instruction-column, so it replaces a conversation's first
    user turn."""
    turns = conv.row_conversation(row)
    if turns is not None:
        return _conversation_example(row, turns, system, rewritten_instruction)
    instruction, output = _text(row[INSTRUCTION]), _text(row[OUTPUT])
    if not instruction.strip():
        raise Skip("skipped_no_instruction")
    if not output.strip():
        raise Skip("skipped_no_response")
    return Example(instruction, _text(row[INPUT]), output, system)


def export(
    output: Location,
    fmt: str,
    to: Path,
    *,
    system: str | None = None,
    instruction_column: str | None = None,
    force: bool = False,
) -> ExportStats:
    """Export the finished run at `output` to `to` in format `fmt` (a FORMATS key): a JSONL
    file, or a `datasets` folder for `hf`. `instruction_column` None reads `instruction` and
    leaves conversations' first user turns as they are."""
    chosen = FORMATS[fmt]
    stats = ExportStats()
    shards = data_files(output)  # before touching `to`: a bad run leaves nothing behind
    multi_turn = chosen.run_keys and has_conversations(shards)
    column = instruction_column or INSTRUCTION

    def records() -> Iterator[dict[str, Any]]:
        for row in read_rows(shards, column):
            try:
                example = to_example(row, system, instruction_column is not None)
            except Skip as skip:
                setattr(stats, skip.counter, getattr(stats, skip.counter) + 1)
                continue
            yield chosen.build(example, multi_turn)

    if chosen.folder:
        stats.written = write_hf_folder(records(), to, force)
    else:
        stats.written = write_jsonl(records(), to, force,
                                    chosen.types_columns if multi_turn else None)
    return stats
