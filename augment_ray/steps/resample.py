"""Task-aware resampling: draw the dataset toward target group ratios (over-sample small groups
by repetition, under-sample large ones). A barrier: it needs every row's group first.

Each row's fate depends only on its id, the seed and its group's factor f = target / count:
floor(f) copies plus one more when hash(seed, id) < frac(f). So the result is the same whatever
the partitioning and parallelism; group sizes hit their targets in expectation."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import ray.data
from pydantic import Field, field_validator

from augment_ray.config.steps import StepSpec
from augment_ray.kinds import step_kind
from augment_ray.rows import ID, ORIGIN_STEP, derived_id, live_mask, reject
from augment_ray.steps.base import Step

log = logging.getLogger(__name__)


def unit_hash(seed: int, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def copies(factor: float, seed: int, row_id: str) -> int:
    whole = math.floor(factor)
    return whole + (1 if unit_hash(seed, row_id) < factor - whole else 0)


def group_keys(table: pa.Table, by: list[str]) -> list[str | None]:
    columns = [table[name].to_pylist() if name in table.column_names else [None] * len(table)
               for name in by]
    return [None if any(v is None for v in values) else "/".join(map(str, values))
            for values in zip(*columns, strict=True)]


def plan_factors(counts: Counter[str], targets: dict[str, float] | None) -> dict[str, float]:
    """Factor per group. No targets: balanced over the groups present. Groups absent from the
    targets keep their rows as they are (factor 1); the listed groups share their own total."""
    if not counts:
        return {}
    if not targets:
        share = sum(counts.values()) / len(counts)
        return {group: share / count for group, count in counts.items()}
    listed = {g: c for g, c in counts.items() if g in targets}
    total = sum(listed.values())
    weight = sum(targets[g] for g in listed)
    factors = {g: 1.0 for g in counts if g not in targets}
    for group, count in listed.items():
        factors[group] = (targets[group] / weight) * total / count if weight else 1.0
    return factors


def _count_groups(batch: pa.Table, by: list[str]) -> pa.Table:
    alive = live_mask(batch).to_pylist()
    counts = Counter(k for k, a in zip(group_keys(batch, by), alive, strict=True)
                     if a and k is not None)
    return pa.table({"group": list(counts), "count": list(counts.values())},
                    schema=pa.schema([("group", pa.string()), ("count", pa.int64())]))


def _resample_batch(batch: pa.Table, by: list[str], factors: dict[str, float], seed: int,
                    step: str) -> pa.Table:
    keys = group_keys(batch, by)
    alive = live_mask(batch).to_pylist()
    ids = batch[ID].to_pylist()
    dropped, extra_rows = [], []
    for index, (key, live, row_id) in enumerate(zip(keys, alive, ids, strict=True)):
        if not live or key is None or key not in factors:
            dropped.append(False)
            continue
        n = copies(factors[key], seed, row_id)
        dropped.append(n == 0)
        extra_rows += [(index, j) for j in range(1, n)]
    out = batch
    if any(dropped):
        reasons = ["resampled_out" if d else None for d in dropped]
        out = reject(batch, pa.array(dropped), step, reasons, [None] * len(batch))
    if extra_rows:
        extra = batch.take([index for index, _ in extra_rows])
        new_ids = [derived_id(ids[index], step, j) for index, j in extra_rows]
        extra = extra.set_column(extra.schema.get_field_index(ID), ID,
                                 pa.array(new_ids, pa.string()))
        extra = extra.set_column(extra.schema.get_field_index(ORIGIN_STEP), ORIGIN_STEP,
                                 pa.array([step] * len(extra), pa.string()))
        out = pa.concat_tables([out, extra])
    return out


class ResampleStepSpec(StepSpec):
    """Draws the dataset toward target group ratios, deterministically for a seed. A barrier."""

    kind: Literal["resample"]
    by: list[str] = Field(
        default_factory=lambda: ["task_category"],
        description="columns whose values form a group, e.g. [task_category, language]",
    )
    targets: dict[str, float] | None = Field(
        None,
        description="ratio per group key ('math' or 'math/en' with two `by` columns); "
        "omitted: balanced over the groups present; unlisted groups are left as they are",
    )
    seed: int = Field(0, description="seed of the draw")

    @field_validator("targets")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and (not value or any(v < 0 for v in value.values())
                                  or sum(value.values()) <= 0):
            raise ValueError("ratios must be >= 0 with a positive sum")
        return value


@step_kind(ResampleStepSpec)
class ResampleStep(Step):

    @classmethod
    def from_spec(cls, spec: Any, job: Any) -> ResampleStep:
        return cls(spec.step_name, spec.by, spec.targets, spec.seed)

    def __init__(self, name: str, by: list[str], targets: dict[str, float] | None,
                 seed: int) -> None:
        self.name = name
        self.by = by
        self.targets = targets
        self.seed = seed
        self.factors: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = ds.materialize()  # the barrier: upstream steps finish here
        counted = ds.map_batches(_count_groups, fn_kwargs={"by": self.by},
                                 batch_format="pyarrow").take_all()
        for row in counted:
            self.counts[row["group"]] += row["count"]
        self.factors = plan_factors(self.counts, self.targets)
        log.info("%s: groups %s -> factors %s", self.name, dict(self.counts),
                 {g: round(f, 3) for g, f in self.factors.items()})
        return ds.map_batches(
            _resample_batch,
            fn_kwargs={"by": self.by, "factors": self.factors, "seed": self.seed,
                       "step": self.name},
            batch_format="pyarrow",
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "by": self.by, "label_columns": self.by,
                "targets": self.targets,
                "seed": self.seed, "group_counts": dict(self.counts),
                "factors": {g: round(f, 4) for g, f in self.factors.items()}}
