"""Task-type classification for task-aware resampling: a category from a fixed list, and the
instruction's language (from its script: more reliable than a small model's guess)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import LLMStepSpec
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import (
    Messages,
    ParseFailure,
    Row,
    detect_language,
    extract_tagged,
    load_template,
)

TASK_CATEGORIES = (
    "math",
    "reasoning",
    "code_generation",
    "code_debugging",
    "writing",
    "extraction",
    "classification",
    "open_qa",
    "translation",
    "brainstorming",
    "other",
)
_WORD = re.compile(r"[a-z]+(?:[ _-][a-z]+)?")


def match_category(text: str) -> str | None:
    """The first category named in text ('Code generation', 'open-QA', 'math.' all count)."""
    lowered = text.lower()
    for candidate in _WORD.findall(lowered):
        key = re.sub(r"[ -]", "_", candidate)
        if key in TASK_CATEGORIES:
            return key
        first = key.split("_")[0]
        if first in TASK_CATEGORIES:
            return first
    return None


class ClassifyTask:
    generates_rows = False
    template_version = "classify.v1"
    TAG = "category"

    def __init__(self, category_column: str, language_column: str) -> None:
        self.category_column = category_column
        self.language_column = language_column
        self.output_columns = (category_column, language_column)

    def prompts(self, row: Row) -> list[Messages]:
        template = load_template("classify", "v1", "en")
        content = template.render(instruction=row["instruction"],
                                  categories=", ".join(TASK_CATEGORIES))
        return [[{"role": "user", "content": content}]]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        tagged = extract_tagged(text, self.TAG)
        category = match_category(tagged if tagged is not None else text)
        if category is None:
            raise ParseFailure("unknown_category", text[:500])
        return {self.category_column: category,
                self.language_column: detect_language(row["instruction"])}


class ClassifyTaskStepSpec(LLMStepSpec):
    """Labels each instruction with a task category (tasks.classify.TASK_CATEGORIES) and its
    language (en/zh, from the script)."""

    kind: Literal["classify_task"]
    category_column: str = Field("task_category", description="column for the task category")
    language_column: str = Field("language", description="column for the language (en/zh)")


@step_kind(ClassifyTaskStepSpec)
class ClassifyTaskStep(LLMStep):
    @classmethod
    def make_task(cls, spec: Any, job: Any, sampling: SamplingParams) -> ClassifyTask:
        return ClassifyTask(spec.category_column, spec.language_column)

    def describe(self) -> dict[str, Any]:
        # the report charts the label mix of these columns
        return {**super().describe(),
                "label_columns": [self.task.category_column, self.task.language_column]}
