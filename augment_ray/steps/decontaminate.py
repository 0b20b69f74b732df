"""The decontaminate step: n-gram overlap with evaluation sets (curate.decontaminate).

The index is built once on the driver (prepare), put in the object store once (apply), and each
Ray task fetches it by reference: Ray Data hands fn_kwargs to the UDF as they are, so the task
resolves the ObjectRef itself (zero-copy, since the index holds only numpy arrays)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import ray
import ray.data

from augment_ray.config import DecontaminateStepSpec
from augment_ray.curate.decontaminate import (
    EvalSetStats,
    NgramIndex,
    build_index,
    decontaminate_table,
)
from augment_ray.steps.base import Step
from augment_ray.summary import redact_uri

log = logging.getLogger(__name__)


def _decontaminate_batch(batch: pa.Table, index: NgramIndex | ray.ObjectRef,
                         columns: list[str], threshold: float, step: str) -> pa.Table:
    if isinstance(index, ray.ObjectRef):
        index = ray.get(index)
    return decontaminate_table(batch, index, columns, threshold, step)


class DecontaminateStep(Step):
    kind = "decontaminate"

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
