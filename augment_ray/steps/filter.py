"""The filter step: heuristic quality rules (curate.filters) on every live row, in Ray tasks."""

from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
import ray.data
from pydantic import Field, field_validator, model_validator

from augment_ray.config.io import InputSpec
from augment_ray.config.steps import StepSpec
from augment_ray.conversations import SIDES
from augment_ray.curate.filters import enabled_rules, filter_table
from augment_ray.io.conversation_input import conversation_column
from augment_ray.io.read import first_shard_schema
from augment_ray.kinds import step_kind, step_kinds
from augment_ray.steps.base import Step

log = logging.getLogger(__name__)



def input_has_column(spec: InputSpec, canonical: str) -> bool:
    """Whether the first input file has the column mapped to `canonical` (the reader adds every
    canonical column, null-filled, so the rows alone cannot tell); a conversation has an
    instruction and an output (its turns). Decided from the first file, as the reader's own
    column check is."""
    source = getattr(spec.columns, canonical)
    schema = first_shard_schema(spec)
    if schema is None:  # an empty first file tells nothing: keep the rules on
        return source is not None
    if conversation_column(schema, spec.columns, spec.uri) is not None:
        return canonical in SIDES  # a conversation's user and assistant turns
    return source is not None and source in schema.names


def _filter_batch(batch: pa.Table, spec: FilterStepSpec, step: str,
                  response_rules: bool) -> pa.Table:
    return filter_table(batch, spec, step, response_rules)


class FilterStepSpec(StepSpec):
    """Heuristic quality filters; each rejected row names the rule it broke (the first one in
    curate.filters.RULE_ORDER)."""

    kind: Literal["filter"]
    instruction_column: str = Field(
        "instruction", description="the prompt; e.g. refined_instruction after a refine step"
    )
    response_column: str = Field(
        "output", description="the answer; response rules are skipped when rows have no such "
        "column (or, for `output`, when neither the input nor an earlier step provides it)"
    )
    min_chars: int | None = Field(
        None, ge=0, description="fewest characters of instruction + input"
    )
    max_chars: int | None = Field(None, gt=0, description="most characters of instruction + input")
    min_response_chars: int | None = Field(
        None, ge=0, description="fewest characters of the response"
    )
    max_response_chars: int | None = Field(
        None, gt=0, description="most characters of the response"
    )
    min_tokens: int | None = Field(
        None, ge=0,
        description="fewest tokens of instruction + input + response; a token is a word or "
        "one punctuation mark (a regex count, not a model tokenizer)",
    )
    max_tokens: int | None = Field(
        None, gt=0, description="most tokens of instruction + input + response"
    )
    max_repeated_ngram_ratio: float | None = Field(
        0.3, gt=0.0, le=1.0,
        description="most share of word 3-grams that repeat an earlier 3-gram of the same text "
        "(instruction and response checked separately); null turns the rule off",
    )
    max_non_printable_ratio: float | None = Field(
        0.1, gt=0.0, le=1.0,
        description="most share of control, private-use and U+FFFD characters in the row's "
        "text; null turns the rule off",
    )
    refusal_phrases: list[str] | None = Field(
        None, description="case-insensitive phrases that mark a refusal; default: a built-in list"
    )
    reject_refusals: bool = Field(
        True, description="reject rows whose response contains a refusal phrase"
    )
    reject_empty_response: bool = Field(
        True, description="reject rows whose response is null or blank (if the column exists)"
    )
    reject_response_equals_instruction: bool = Field(
        True, description="reject rows whose response equals the instruction after folding "
        "(NFKC, case, whitespace)"
    )

    @field_validator("refusal_phrases")
    @classmethod
    def _no_blank_phrase(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not phrase.strip() for phrase in value):
            raise ValueError("a blank phrase would match every response; remove it")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> FilterStepSpec:
        for low, high in (("min_chars", "max_chars"),
                          ("min_response_chars", "max_response_chars"),
                          ("min_tokens", "max_tokens")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ValueError(f"{low} {low_value} is above {high} {high_value}")
        return self


@step_kind(FilterStepSpec)
class FilterStep(Step):

    @classmethod
    def from_spec(cls, spec: Any, job: Any) -> FilterStep:
        steps = step_kinds()
        before = job.steps[:next(i for i, s in enumerate(job.steps) if s is spec)]
        written = any(steps[s.kind].writes_response for s in before)
        return cls(spec, job.input, response_written_before=written)

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
        described = {**super().describe(), "rules": rules, "response_rules": self.response_note}
        if not self.response_rules:
            described["note"] = "response rules skipped (no output column)"
        return described
