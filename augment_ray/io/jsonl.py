"""JSONL input files -> one table, and the lines that could not be read.

pyarrow's reader first. When it fails, the file is read line by line: lines that are not UTF-8
are set aside (they become rejected rows, not a failed file) and the rest parsed again. A
column whose values pyarrow cannot give one type across the lines (a conversation whose turns
are objects on one line and strings on another) is read with Python's json instead and kept as
JSON text, marked in its field's metadata (`json_encoded`), so that the normalizer can judge
each row's value on its own. A JSON syntax error, or a mixed scalar column, still fails the file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson

from augment_ray.storage import Location

# field metadata of a column kept as JSON text
JSON_ENCODED = {b"augment_ray.encoding": b"json"}


@dataclass(frozen=True)
class UnreadableLine:
    """A JSONL line that is not valid UTF-8: it becomes a rejected row, not a failed file."""

    number: int  # 1-based line number in the file
    raw: bytes
    problem: str


def json_encoded(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"augment_ray.encoding") == b"json"


def read_jsonl(loc: Location, path: str) -> tuple[pa.Table | None, list[UnreadableLine]]:
    """pyarrow's reader does not check UTF-8 inside strings, so the table is checked after."""
    try:
        with loc.fs.open_input_stream(path) as stream:
            table = pajson.read_json(stream)
        table.validate(full=True)  # raises ArrowInvalid on strings that are not UTF-8
        return table, []
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        first_error = error
    with loc.fs.open_input_stream(path) as stream:
        data = stream.read()
    if not data or data.isspace():  # an empty file: no rows (pyarrow calls it an error)
        return None, []
    good, unreadable = split_utf8_lines(data)
    if not good:
        return None, unreadable
    if unreadable:  # without the lines that are not UTF-8 pyarrow may read the rest
        try:
            table = pajson.read_json(io.BytesIO(b"\n".join(good)))
            table.validate(full=True)
            return table, unreadable
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            first_error = error
    table = read_json_lines(good)
    if table is None:
        raise first_error
    return table, unreadable


def split_utf8_lines(data: bytes) -> tuple[list[bytes], list[UnreadableLine]]:
    good: list[bytes] = []
    unreadable: list[UnreadableLine] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            unreadable.append(UnreadableLine(
                number, line, f"{error.reason} at byte {error.start + 1} of the line"
            ))
        else:
            good.append(line)
    return good, unreadable


def read_json_lines(lines: list[bytes]) -> pa.Table | None:
    """The lines parsed with Python's json: a column pyarrow cannot type from its values is
    kept as JSON text when it holds lists or objects (None when it holds only scalars, or a
    line is not a JSON object: the caller reports pyarrow's own error)."""
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        records.append(record)
    names = list(dict.fromkeys(name for record in records for name in record))
    fields, arrays = [], []
    for name in names:
        values = [record.get(name) for record in records]
        try:
            array = pa.array(values)
            fields.append(pa.field(name, array.type))
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            if not any(isinstance(value, (list, dict)) for value in values):
                return None
            array = pa.array([None if value is None else json.dumps(value, ensure_ascii=False)
                              for value in values], pa.string())
            fields.append(pa.field(name, pa.string(), metadata=JSON_ENCODED))
        arrays.append(array)
    try:
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        table.validate(full=True)
    except (pa.ArrowException, UnicodeError):
        return None
    return table
