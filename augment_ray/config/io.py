"""Where a job's rows come from and where they go."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from augment_ray.config.base import Spec, StorageOptions


class ColumnMap(Spec):
    """Maps the pipeline's canonical columns to the user's column names. Mapped columns are
    renamed to the canonical name on read; every other input column is kept as it is."""

    instruction: str = "instruction"
    input: str | None = Field(
        "input", description="optional context; used when the column exists"
    )
    output: str | None = Field(
        "output", description="optional response; used when the column exists"
    )
    id: str | None = Field(
        "id", description="a stable row id, used when the column exists; else content-derived"
    )


class InputSpec(Spec):
    uri: str = Field(description="file, folder or prefix: /data/x, s3://bucket/p, oss://bucket/p")
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    columns: ColumnMap = ColumnMap()
    storage: StorageOptions | None = None
    max_row_chars: int = Field(
        200_000, gt=0, description="rows whose text is longer are rejected as too_long"
    )


class OutputSpec(Spec):
    uri: str
    mode: Literal["error-if-exists", "overwrite"] = "error-if-exists"
    storage: StorageOptions | None = None
    max_rows_per_file: int = Field(100_000, gt=0)


