"""The text a curation step compares: chosen columns joined, then folded (vectorized pyarrow).

`fold` is the one text folding of the package: the curation steps apply it to columns, and
`fold_str` applies it to one Python string (answer comparison, copy-of-seed checks, labels)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.config.base import NormalizeSpec
from augment_ray.conversations import MESSAGES, SIDES, side_text
from augment_ray.curate.hashing import as_array
from augment_ray.errors import InputDataError
from augment_ray.rows import require_columns

COLUMN_SEPARATOR = "\n"
FOLD = NormalizeSpec()  # the default folding: NFKC, lower case, whitespace collapsed and trimmed


def text_columns(table: pa.Table, columns: list[str], step: str) -> list[pa.ChunkedArray]:
    """The named columns as strings; a missing or non-text column is a clear error.

    On conversation rows (conversations.py) `instruction` reads every user turn and `output`
    every assistant turn, joined by newlines, and `messages` the whole conversation as
    'role: text' lines: a step compares what the conversation says, not just its first
    question and last answer."""
    require_columns(table, step, columns, "fix `steps[].columns`")
    turns = _conversations(table)
    arrays = []
    for name in columns:
        if name == MESSAGES and turns is not None:
            arrays.append(pa.chunked_array([side_text(turns, None)]))
            continue
        column = table[name]
        if turns is not None and name in SIDES:
            column = pa.chunked_array([pc.if_else(pc.is_valid(turns), side_text(
                turns, SIDES[name]), column.cast(pa.string()).combine_chunks())])
        if pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
            column = column.cast(pa.string())
        if not pa.types.is_string(column.type):
            raise InputDataError(
                f"Step {step!r} compares column {name!r}, which holds {column.type}, not text."
            )
        arrays.append(column)
    return arrays


def _conversations(table: pa.Table) -> pa.ChunkedArray | None:
    """The table's `messages` column when it holds conversations (a block of single-turn rows
    has none, or an all-null one)."""
    if MESSAGES not in table.column_names:
        return None
    column = table[MESSAGES]
    return column if pa.types.is_list(column.type) else None


def fold(text: pa.ChunkedArray | pa.Array,
         spec: NormalizeSpec = FOLD) -> pa.ChunkedArray | pa.Array:
    if spec.unicode != "none":
        text = pc.utf8_normalize(text, form=spec.unicode)
    if spec.case:
        text = pc.utf8_lower(text)
    if spec.whitespace:
        text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s+", " "))
    return text


def fold_str(text: str, spec: NormalizeSpec = FOLD) -> str:
    """`fold` of one string."""
    return fold(pa.array([text], pa.string()), spec)[0].as_py()


def joined_text(table: pa.Table, columns: list[str], spec: NormalizeSpec,
                step: str) -> pa.Array:
    """One folded string per row: the columns joined by a newline, nulls read as empty."""
    arrays = [pc.fill_null(a, "") for a in text_columns(table, columns, step)]
    if len(arrays) == 1:
        joined = arrays[0]
    else:
        joined = pc.binary_join_element_wise(*arrays, COLUMN_SEPARATOR)
    return as_array(fold(joined, spec))
