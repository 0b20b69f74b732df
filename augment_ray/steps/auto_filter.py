"""CLEAR Auto-Filter, and the dataset-wide confidence threshold it shares with Auto-Correct.

A quantile threshold (default: the median) is computed over every live row of the dataset, not
per block: the step is then a barrier (the dataset is materialized first). An absolute
threshold streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.data
from pydantic import Field

from augment_ray.config.steps import StepSpec
from augment_ray.kinds import step_kind
from augment_ray.rows import live_mask, reject_rows, require_columns
from augment_ray.steps.base import Step

log = logging.getLogger(__name__)
TIE_WARNING_SHARE = 0.1


class ConfidenceThresholdSpec(StepSpec):
    """Where a dataset-wide confidence threshold comes from (a barrier: the whole dataset is
    scored before it is computed)."""

    confidence_column: str = Field(
        "score_confidence", description="the confidence written by a score step"
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="absolute threshold; unset: the `quantile`"
    )
    quantile: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="threshold = this quantile of the confidence over all live rows of the "
        "dataset (default: the median)",
    )


class AutoFilterStepSpec(ConfidenceThresholdSpec):
    """CLEAR Auto-Filter: keeps rows whose confidence is at or above the threshold; the rest go
    to _rejects as low_confidence, with their scores."""

    kind: Literal["auto_filter"]


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: no live row has a confidence, nothing to compare
    how: str  # e.g. "median of 1,000 rows" or "absolute"
    rows: int = 0
    tied: int = 0  # rows whose confidence equals a quantile threshold: all of them are kept

    def describe(self) -> dict[str, Any]:
        return {"threshold": None if self.value is None else round(self.value, 6),
                "threshold_from": self.how, "scored_rows": self.rows,
                "rows_at_threshold": self.tied, "note": self.note()}

    def note(self) -> str:
        """The summary line's words on the threshold."""
        if self.value is None:
            return f"no threshold ({self.how})"
        tied = f", {self.tied} rows at it, kept" if self.tied > 1 else ""
        return f"threshold {self.value:.4f} ({self.how}{tied})"


def _confidence(batch: pa.Table, column: str, step: str) -> pa.ChunkedArray:
    require_columns(batch, step, [column],
                    "put a `score` step before it or set `confidence_column`")
    return batch[column]


def _live_confidences(batch: pa.Table, column: str, step: str) -> pa.Table:
    values = _confidence(batch, column, step).filter(live_mask(batch)).drop_null()
    return pa.table({"confidence": pa.array(values.to_numpy(), pa.float64())})


def quantile_name(q: float) -> str:
    return "median" if q == 0.5 else f"quantile {q:g}"


def dataset_threshold(ds: ray.data.Dataset, spec: ConfidenceThresholdSpec, step: str
                      ) -> tuple[ray.data.Dataset, Threshold]:
    """The threshold of `spec` over the whole dataset. Returns the dataset to continue from
    (materialized when the threshold needed every row first)."""
    if spec.threshold is not None:
        return ds, Threshold(spec.threshold, "absolute")
    ds = ds.materialize()  # the barrier: every row is scored before the quantile is taken
    refs = ds.map_batches(
        _live_confidences, fn_kwargs={"column": spec.confidence_column, "step": step},
        batch_format="pyarrow",
    ).to_arrow_refs()
    tables = [table for table in ray.get(refs) if len(table)]
    values = np.concatenate([t["confidence"].to_numpy() for t in tables]) if tables \
        else np.zeros(0)
    how = f"{quantile_name(spec.quantile)} of {len(values):,} rows"
    if len(values) == 0:
        return ds, Threshold(None, how)
    value = float(np.quantile(values, spec.quantile))
    tied = int(np.count_nonzero(values == value))
    log.info("%s: threshold %.4f (%s)", step, value, how)
    if tied > len(values) * TIE_WARNING_SHARE:
        # coarse scores (a self-reflection of 1.0, a consistency of 0.0): rows at the threshold
        # are kept, so far fewer rows than the quantile says may go
        log.warning("%s: %d of %d rows have exactly the threshold confidence %.4f and are all "
                    "kept; the scores are too coarse for a %s cut (combine methods, or set an "
                    "absolute `threshold`)", step, tied, len(values), value,
                    quantile_name(spec.quantile))
    return ds, Threshold(value, how, len(values), tied)


def split_by_threshold(batch: pa.Table, column: str, threshold: Threshold, step: str
                       ) -> tuple[list[bool], dict[int, tuple[str, str]]]:
    """(below the threshold, per live row) and rejections of live rows with no confidence."""
    confidence = _confidence(batch, column, step).to_pylist()
    live = live_mask(batch).to_pylist()
    below, missing = [], {}
    for index, (value, alive) in enumerate(zip(confidence, live, strict=True)):
        if alive and value is None:
            missing[index] = ("missing_confidence",
                              f"no {column} (was the row scored by an earlier step?)")
        below.append(bool(alive and value is not None and threshold.value is not None
                          and value < threshold.value))
    return below, missing


def _filter_batch(batch: pa.Table, column: str, threshold: Threshold, step: str) -> pa.Table:
    below, failures = split_by_threshold(batch, column, threshold, step)
    confidence = batch[column].to_pylist()
    for index, is_below in enumerate(below):
        if is_below:
            failures[index] = ("low_confidence", f"confidence {confidence[index]:.4f} < "
                               f"threshold {threshold.value:.4f} ({threshold.how})")
    return reject_rows(batch, step, failures)


@step_kind(AutoFilterStepSpec)
class AutoFilterStep(Step):

    def __init__(self, spec: AutoFilterStepSpec) -> None:
        self.name = spec.step_name
        self.spec = spec
        self.threshold: Threshold | None = None

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        ds, self.threshold = dataset_threshold(ds, self.spec, self.name)
        return ds.map_batches(
            _filter_batch,
            fn_kwargs={"column": self.spec.confidence_column, "threshold": self.threshold,
                       "step": self.name},
            batch_format="pyarrow",
        )

    def describe(self) -> dict[str, Any]:
        threshold = self.threshold.describe() if self.threshold else {}
        return {**super().describe(), "confidence_column": self.spec.confidence_column,
                "rule": "keep confidence >= threshold", **threshold}
