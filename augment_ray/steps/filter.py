"""The filter step: heuristic quality rules (curate.filters) on every live row, in Ray tasks."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import ray.data

from augment_ray.config import FilterStepSpec, InputSpec
from augment_ray.curate.filters import enabled_rules, filter_table
from augment_ray.io.read import list_input_shards, read_shard_batches
from augment_ray.steps.base import Step
from augment_ray.storage import location

log = logging.getLogger(__name__)

# step kinds that write `output` on the rows they pass on
RESPONSE_WRITERS = frozenset({"respond", "pair_expand"})


def input_has_column(spec: InputSpec, canonical: str) -> bool:
    """Whether the first input file has the column mapped to `canonical` (the reader adds every
    canonical column, null-filled, so the rows alone cannot tell). Decided from the first file,
    as the reader's own column check is."""
    source = getattr(spec.columns, canonical)
    if source is None:
        return False
    shard = list_input_shards(spec)[0]
    for table in read_shard_batches(location(spec.uri, spec.storage), shard):
        return source in table.column_names
    return True  # an empty first file tells nothing: keep the rules on


def _filter_batch(batch: pa.Table, spec: FilterStepSpec, step: str,
                  response_rules: bool) -> pa.Table:
    return filter_table(batch, spec, step, response_rules)


class FilterStep(Step):
    kind = "filter"

    def __init__(self, spec: FilterStepSpec, input_spec: InputSpec | None = None,
                 response_written_before: bool = False) -> None:
        self.name = spec.step_name
        self.spec = spec
        self.input_spec = input_spec
        self.response_written_before = response_written_before
        self.response_rules = True
        self.response_note = "on"

    def prepare(self) -> None:
        if (self.spec.response_column != "output" or self.response_written_before
                or self.input_spec is None):
            return
        if not input_has_column(self.input_spec, "output"):
            self.response_rules = False
            self.response_note = "skipped: the input has no output column and no earlier " \
                "step writes one"
            log.warning("%s: %s", self.name, self.response_note)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(
            _filter_batch,
            fn_kwargs={"spec": self.spec, "step": self.name,
                       "response_rules": self.response_rules},
            batch_format="pyarrow",
        )

    def describe(self) -> dict[str, Any]:
        rules = list(enabled_rules(self.spec, with_response=self.response_rules))
        return {**super().describe(), "rules": rules, "response_rules": self.response_note}
