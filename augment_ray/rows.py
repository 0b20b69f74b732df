"""What every row carries through the pipeline: a stable id, lineage and its reject status.

A rejected row is not dropped: it keeps flowing with `reject_step`/`reject_reason` set, later
steps pass it through untouched, and the writer routes it to `_rejects/`. So every input row
ends up in exactly one of the two outputs, and the run's accounting is computed from the rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.errors import InputDataError

ID = "id"
SOURCE_ID = "source_id"  # the input row this row descends from (itself for input rows)
ORIGIN_STEP = "origin_step"  # the step that created the row ("input" for input rows)
REJECT_STEP = "reject_step"
REJECT_REASON = "reject_reason"
REJECT_DETAIL = "reject_detail"

CANONICAL_TEXT = ("instruction", "input", "output")
LINEAGE = (ID, SOURCE_ID, ORIGIN_STEP)
REJECT_COLUMNS = (REJECT_STEP, REJECT_REASON, REJECT_DETAIL)
RESERVED = frozenset(LINEAGE + REJECT_COLUMNS)
INPUT_STEP = "input"


def content_id(values: Sequence[str | None], occurrence: int = 0, shard: str = "") -> str:
    """16 hex chars of SHA-256 over the row's text, salted with the input shard's name (its
    path under the input URI) and, for the n-th exact repeat within that shard (n >= 1), with
    n: identical rows get distinct ids, stable across reruns, which dedup relies on."""
    payload = json.dumps(list(values), ensure_ascii=False)
    if shard:
        payload += f"\x1e{shard}"
    if occurrence:
        payload += f"\x1f{occurrence}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def content_ids(columns: Sequence[Sequence[str | None]], seen: Counter[str],
                shard: str = "") -> list[str]:
    """Ids for a batch of rows; `seen` carries repeat counts across batches of one shard."""
    ids = []
    for values in zip(*columns, strict=False):
        key = content_id(values, 0, shard)
        occurrence = seen[key]
        seen[key] += 1
        ids.append(content_id(values, occurrence, shard) if occurrence else key)
    return ids


def derived_id(parent_id: str, step: str, index: int) -> str:
    """Id of a row a step generated from `parent_id`: stable across reruns."""
    return hashlib.sha256(f"{parent_id}\x1f{step}\x1f{index}".encode()).hexdigest()[:16]


def live_mask(table: pa.Table) -> pa.ChunkedArray:
    """True for rows no step has rejected."""
    return pc.is_null(table[REJECT_STEP])


def reject(table: pa.Table, mask: pa.Array, step: str, reasons: list[str | None],
           details: list[str | None]) -> pa.Table:
    """Mark rows where `mask` is true as rejected by `step` (reasons/details per row)."""
    step_column = pc.if_else(mask, pa.scalar(step), table[REJECT_STEP])
    reason_column = pc.if_else(mask, pa.array(reasons, pa.string()), table[REJECT_REASON])
    detail_column = pc.if_else(mask, pa.array(details, pa.string()), table[REJECT_DETAIL])
    for name, column in (
        (REJECT_STEP, step_column),
        (REJECT_REASON, reason_column),
        (REJECT_DETAIL, detail_column),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def reject_rows(table: pa.Table, step: str,
                failures: dict[int, tuple[str, str | None]]) -> pa.Table:
    """Mark the rows at the given positions as rejected by `step`: {row: (reason, detail)}."""
    if not failures:
        return table
    n = len(table)
    mask = [i in failures for i in range(n)]
    reasons = [failures[i][0] if i in failures else None for i in range(n)]
    details = [failures[i][1] if i in failures else None for i in range(n)]
    return reject(table, pa.array(mask, pa.bool_()), step, reasons, details)


def require_columns(table: pa.Table, step: str, columns: Sequence[str], fix: str = "") -> None:
    """A clear InputDataError for the first of `columns` the rows do not have: the step, the
    column, the columns they have, and `fix` (what to change in the job)."""
    for name in columns:
        if name not in table.column_names:
            raise InputDataError(
                f"Step {step!r} needs column {name!r}, which the rows do not have (they have: "
                f"{', '.join(table.column_names)})" + (f"; {fix}." if fix else ".")
            )


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, values)
    return table.append_column(name, values)
