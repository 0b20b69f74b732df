"""The decontaminate step: n-gram overlap with evaluation sets (curate.decontaminate).

The index is built once on the driver (prepare), put in the object store once (apply), and each
Ray task fetches it by reference: Ray Data hands fn_kwargs to the UDF as they are, so the task
resolves the ObjectRef itself (zero-copy, since the index holds only numpy arrays)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
import ray
import ray.data
from pydantic import Field, field_validator

from augment_ray.config.base import Spec, StorageOptions
from augment_ray.config.steps import TextColumnsSpec
from augment_ray.curate.decontaminate import (
    EvalSetStats,
    NgramIndex,
    build_index,
    decontaminate_table,
)
from augment_ray.kinds import step_kind
from augment_ray.steps.base import Step
from augment_ray.summary import redact_uri

log = logging.getLogger(__name__)


def _decontaminate_batch(batch: pa.Table, index: NgramIndex | ray.ObjectRef,
                         columns: list[str], threshold: float, step: str) -> pa.Table:
    if isinstance(index, ray.ObjectRef):
        index = ray.get(index)
    return decontaminate_table(batch, index, columns, threshold, step)


class EvalSetSpec(Spec):
    """One evaluation set to keep out of the training data."""

    uri: str = Field(description="jsonl or parquet file/folder: local, s3:// or oss://")
    columns: list[str] = Field(
        default_factory=lambda: ["question"],
        min_length=1,
        description="text columns of the eval rows; a list-valued column (e.g. MT-Bench turns) "
        "gives one text per element, all belonging to that eval row",
    )
    name: str | None = Field(
        None, description="label used in reject details; default: file or folder name "
        "without extension"
    )
    id_column: str | None = Field(
        None, description="column whose value names an eval row in reject details; "
        "default: the row's 0-based position in the set (files in sorted order)"
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions, description="object-store options for `uri`")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        last = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return last.split(".", 1)[0] or last


class DecontaminateStepSpec(TextColumnsSpec):
    """Rejects rows whose text shares too many word n-grams with one item of an evaluation
    set."""

    kind: Literal["decontaminate"]
    eval_sets: list[EvalSetSpec] = Field(min_length=1, description="the sets to check against")
    columns: list[str] = Field(
        default_factory=lambda: ["instruction"],
        min_length=1,
        description="row columns checked against the eval sets (joined, nulls as empty)",
    )
    ngram: int = Field(8, gt=0, le=64, description="word n-gram size")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0,
        description="reject when at least this share of the row's distinct n-grams appear in "
        "one eval item",
    )

    @field_validator("eval_sets")
    @classmethod
    def _distinct_labels(cls, value: list[EvalSetSpec]) -> list[EvalSetSpec]:
        labels = [eval_set.label for eval_set in value]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"eval set name {', '.join(map(repr, repeated))} is used twice; give the sets "
                "distinct `name`s"
            )
        return value


@step_kind(DecontaminateStepSpec)
class DecontaminateStep(Step):

    def __init__(self, spec: DecontaminateStepSpec) -> None:
        self.name = spec.step_name
        self.spec = spec
        self.index: NgramIndex | None = None
        self.stats: list[EvalSetStats] = []
        self.index_ref: ray.ObjectRef | None = None  # held until the run ends

    def prepare(self) -> None:
        self.index, self.stats = build_index(self.spec.eval_sets, self.spec.ngram, self.name)
        for stat in self.stats:
            log.info("%s: eval set %s: %d items, %d distinct %d-grams", self.name, stat.name,
                     stat.items, stat.ngrams, self.spec.ngram)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.index is None:
            self.prepare()
        self.index_ref = ray.put(self.index)
        return ds.map_batches(
            _decontaminate_batch,
            fn_kwargs={"index": self.index_ref, "columns": self.spec.columns,
                       "threshold": self.spec.threshold, "step": self.name},
            batch_format="pyarrow",
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "columns": self.spec.columns,
            "ngram": self.spec.ngram,
            "threshold": self.spec.threshold,
            "eval_sets": [self._describe_set(number) for number in
                          range(len(self.spec.eval_sets))],
        }

    def _describe_set(self, number: int) -> dict[str, Any]:
        spec = self.spec.eval_sets[number]
        entry: dict[str, Any] = {"name": spec.label, "uri": redact_uri(spec.uri)}
        if number < len(self.stats):  # known once prepare() has read the set
            entry |= {"items": self.stats[number].items, "ngrams": self.stats[number].ngrams}
        return entry
