"""Response writing (distillation): a teacher model answers each instruction."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import CheckedStepSpec, LLMStepSpec
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import Messages, ParseFailure, Row, load_template
from augment_ray.validate.checks import Candidate, Embed, Failure, ResponseChecks


class RespondTask:
    generates_rows = False
    template_version = "respond.v1"

    def __init__(self, instruction_column: str, previous_output_column: str,
                 checks: ResponseChecks | None = None) -> None:
        self.checks = checks
        self.instruction_column = instruction_column
        self.previous_output_column = previous_output_column
        self.output_columns = ("output", previous_output_column)
        self.diversity_columns = (instruction_column, "output")

    def prompts(self, row: Row) -> list[Messages]:
        instruction = row.get(self.instruction_column)
        if not instruction or not str(instruction).strip():
            raise ParseFailure("missing_instruction", f"{self.instruction_column} is empty")
        context = row.get("input") or ""
        template = load_template("respond", "v1", "any")  # no words of its own
        content = template.render(instruction=instruction, context=context).strip()
        return [[{"role": "user", "content": content}]]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        answer = text.strip()
        if not answer:
            raise ParseFailure("empty_output", text[:500])
        return {"output": answer, self.previous_output_column: row.get("output")}

    def check(self, entries: list[tuple[Row, dict, Any, bool]], embed: Embed | None
              ) -> list[Failure | None]:
        assert self.checks is not None
        return self.checks.check([Candidate(str(row[self.instruction_column]), values["output"])
                                  for row, values, _, _ in entries], embed)


class RespondStepSpec(CheckedStepSpec, LLMStepSpec):
    """Writes the response to each instruction with a teacher engine (distillation). The row's
    existing response, if any, is kept in `<name>_previous_output`."""

    kind: Literal["respond"]
    instruction_column: str = Field(
        "instruction", description="e.g. refined_instruction after a refine step"
    )
    reject_truncated: bool = Field(
        True, description="reject responses cut off by max_tokens instead of keeping them")
    checks: ResponseChecks = Field(
        default_factory=ResponseChecks, description="what a response must be to be kept "
        "(docs/CURATION.md#checks); false: keep every parsable answer")


@step_kind(RespondStepSpec)
class RespondStep(LLMStep):
    writes_response = True

    @classmethod
    def make_task(cls, spec: Any, job: Any, sampling: SamplingParams) -> RespondTask:
        return RespondTask(spec.instruction_column, f"{spec.step_name}_previous_output",
                           spec.checks)
