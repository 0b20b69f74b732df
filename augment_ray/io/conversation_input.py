"""An input's conversation column -> the canonical `messages` column and the text columns
derived from its turns (augment_ray/conversations.py has the contract). A conversation that
cannot be used rejects its row (reason and detail from conversations.BadConversation, naming
the turn); the rest of the file goes on."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, cast

import pyarrow as pa

from augment_ray.config.io import CONVERSATION_FIELDS, ColumnMap
from augment_ray.conversations import (
    BadConversation,
    Layout,
    Turn,
    conversation_from,
    first_user,
    last_assistant,
)
from augment_ray.errors import InputDataError
from augment_ray.io.jsonl import json_encoded


@dataclass(frozen=True)
class ConversationColumn:
    source: str  # the input's column
    field: str  # the input.columns entry naming it: messages, conversations or turns
    layout: Layout


def conversation_column(schema: pa.Schema, columns: ColumnMap,
                        where: str) -> ConversationColumn | None:
    """The input's conversation column, if it has one (at most one)."""
    present = [ConversationColumn(source, field, cast(Layout, layout))
               for field, layout in CONVERSATION_FIELDS.items()
               if (source := getattr(columns, field)) is not None and source in schema.names]
    if len(present) > 1:
        named = ", ".join(f"{c.source!r} (input.columns.{c.field})" for c in present)
        raise InputDataError(
            f"Input {where} has {len(present)} conversation columns: {named}; a row holds one "
            "conversation. Drop or rename all but one, or set the others' input.columns entry "
            "to null."
        )
    return present[0] if present else None


def check_no_text_columns(schema: pa.Schema, mapping: dict[str, str | None],
                          conversation: ConversationColumn, where: str) -> None:
    """With a conversation, instruction, input and output are derived from its turns: a column
    mapped to one of them beside it would be silently overwritten."""
    for canonical, source in mapping.items():
        if source is not None and source in schema.names:
            raise InputDataError(
                f"Input {where} has a conversation column {conversation.source!r} "
                f"(input.columns.{conversation.field}) and a column {source!r} (mapped to "
                f"{canonical}); with a conversation, instruction, input and output are derived "
                f"from its turns. Drop or rename {source!r}."
            )


@dataclass
class ParsedConversations:
    turns: list[list[Turn] | None]  # None for a rejected row
    failures: dict[int, tuple[str, str]]  # row -> (reject reason, detail)
    id_values: list[str]  # the turns (a rejected row: its raw value as JSON), for content ids
    lengths: list[int]  # characters of all turns

    @property
    def instructions(self) -> pa.Array:
        return pa.array([first_user(t) if t else None for t in self.turns], pa.string())

    @property
    def outputs(self) -> pa.Array:
        return pa.array([last_assistant(t) if t else None for t in self.turns], pa.string())


def parse_conversations(table: pa.Table, conversation: ConversationColumn) -> ParsedConversations:
    field = table.schema.field(conversation.source)
    values, not_utf8 = _values(table[conversation.source], field)
    parsed = ParsedConversations([], {}, [], [])
    for row, value in enumerate(values):
        turns: list[Turn] | None = None
        if row in not_utf8:
            parsed.failures[row] = ("invalid_utf8", f"column {conversation.source!r} (the "
                                    "conversation) holds text that is not valid UTF-8")
        else:
            try:
                turns = conversation_from(value, conversation.layout)
            except BadConversation as bad:
                parsed.failures[row] = (bad.reason, bad.detail)
        parsed.turns.append(turns)
        parsed.id_values.append(_turns_key(turns) if turns is not None else _json(value))
        parsed.lengths.append(sum(len(t["content"]) for t in turns) if turns else 0)
    return parsed


def _turns_key(turns: list[Turn]) -> str:
    # what a content id hashes of the turns: unambiguous (roles are fixed words, control
    # characters separate), and 3x cheaper than JSON on a million rows
    return "\x1e".join(f"{turn['role']}\x1f{turn['content']}" for turn in turns)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _values(column: pa.ChunkedArray, field: pa.Field) -> tuple[list[Any], set[int]]:
    """The column's values as Python objects, and the rows holding text that is not UTF-8."""
    if json_encoded(field):  # JSONL whose column had no one type: JSON text per row
        return [None if v is None else json.loads(v) for v in column.to_pylist()], set()
    try:
        column.validate(full=True)  # readers do not always check UTF-8 inside nested values
        return column.to_pylist(), set()
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    values: list[Any] = []
    bad: set[int] = set()
    for row, scalar in enumerate(itertools.chain.from_iterable(column.chunks)):
        try:
            values.append(scalar.as_py())
        except (UnicodeDecodeError, pa.ArrowException):
            values.append(None)
            bad.add(row)
    return values, bad
