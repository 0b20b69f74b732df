"""Instruction refinement (PAI Instruct-Refine): make an instruction more specific and helpful."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import CheckedStepSpec, PAIStepSpec
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import Messages, Row, answer_text, detect_language, load_template
from augment_ray.validate.checks import Candidate, Embed, Failure, RewriteChecks

# alibaba-pai/Qwen2-1.5B-Instruct-Refine, alibaba-pai/Qwen2-7B-Instruct-Refine, local copies
NATIVE_REFINE_MODEL = re.compile(r"qwen2-(1\.5|7)b-instruct-refine", re.IGNORECASE)


def is_native_refine_model(model: str) -> bool:
    return bool(NATIVE_REFINE_MODEL.search(model))


class RefineTask:
    TAG = "refined"

    def __init__(self, native: bool, output_column: str,
                 checks: RewriteChecks | None = None) -> None:
        self.native = native
        self.checks = checks
        self.output_column = output_column
        self.output_columns = (output_column,)
        self.diversity_columns = ("instruction", output_column)
        self.generates_rows = False
        self.template_version = "native" if native else "refine.v1"

    def prompts(self, row: Row) -> list[Messages]:
        instruction = row["instruction"]
        if self.native:
            # the native models were trained on the raw instruction as the only user message
            return [[{"role": "user", "content": instruction}]]
        template = load_template("refine", "v1", detect_language(instruction))
        context = row.get("input") or ""
        if context:
            instruction = f"{instruction}\n\n{context}"
        return [[{"role": "user", "content": template.render(instruction=instruction)}]]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        return {self.output_column: answer_text(text, self.TAG, self.native)}

    def check(self, entries: list[tuple[Row, dict, Any, bool]], embed: Embed | None
              ) -> list[Failure | None]:
        assert self.checks is not None
        return self.checks.check([
            Candidate(row["instruction"], values[self.output_column], template=None
                      if self.native else load_template(
                          "refine", "v1", detect_language(row["instruction"])).text)
            for row, values, _, _ in entries], embed)


class RefineStepSpec(CheckedStepSpec, PAIStepSpec):
    """Instruction refinement: rewrite each instruction so a model answers it more helpfully."""

    kind: Literal["refine"]
    output_column: str = Field(
        "refined_instruction", description="column for the rewritten instruction")
    checks: RewriteChecks = Field(
        default_factory=RewriteChecks, description="what a rewrite must be to be kept "
        "(docs/CURATION.md#checks); false: keep every parsable answer")


@step_kind(RefineStepSpec)
class RefineStep(LLMStep):
    @classmethod
    def make_task(cls, spec: Any, job: Any, sampling: SamplingParams) -> RefineTask:
        model = job.engines[spec.engine].model
        return RefineTask(spec.is_native(model, is_native_refine_model), spec.output_column,
                          spec.checks)

    def describe(self) -> dict[str, Any]:
        # the report shows seed vs rewritten instruction from this column
        return {**super().describe(), "rewrites_instruction": self.task.output_column}
