"""Instruction expansion (PAI Instruct-Exp): new instructions of the same task type."""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import CheckedStepSpec, PAIStepSpec
from augment_ray.curate.text import fold_str
from augment_ray.errors import JobSpecError
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import (
    Messages,
    ParseFailure,
    Row,
    answer_text,
    detect_language,
    load_template,
)
from augment_ray.validate.checks import Candidate, Embed, Failure, NewInstructionChecks

# alibaba-pai/Qwen2-1.5B-Instruct-Exp, alibaba-pai/Qwen2-7B-Instruct-Exp, local copies
NATIVE_EXPAND_MODEL = re.compile(r"qwen2-(1\.5|7)b-instruct-exp\b", re.IGNORECASE)


def is_native_expand_model(model: str) -> bool:
    return bool(NATIVE_EXPAND_MODEL.search(model))


class ExpandTask:
    TAG = "instruction"
    output_columns = ("instruction",)
    diversity_columns = ("instruction", "instruction")  # seeds' vs new rows'
    generates_rows = True

    def __init__(self, native: bool, n: int, few_shot: int = 0, seed: int = 0,
                 checks: NewInstructionChecks | None = None) -> None:
        self.native = native
        self.checks = checks
        self.n = n
        self.few_shot = few_shot
        self.seed = seed
        self.template_version = (
            "native" if native else "expand_fewshot.v1" if few_shot else "expand.v1"
        )
        self._pool: list[Row] = []

    def with_batch(self, rows: list[Row]) -> None:
        """The rows few-shot examples are drawn from: the live rows of this batch."""
        self._pool = rows

    def _examples(self, row: Row) -> list[str]:
        others = [r["instruction"] for r in self._pool if r["id"] != row["id"]]
        rng = random.Random(f"{self.seed}:{row['id']}")
        return [row["instruction"], *rng.sample(others, min(self.few_shot, len(others)))]

    def prompts(self, row: Row) -> list[Messages]:
        instruction = row["instruction"]
        if self.native:
            # one new instruction per generation: n samples of the same raw-text prompt
            content = instruction
        elif self.few_shot:
            examples = "\n".join(f"{i}. {text}" for i, text in
                                  enumerate(self._examples(row), start=1))
            template = load_template("expand_fewshot", "v1", detect_language(instruction))
            content = template.render(examples=examples)
        else:
            template = load_template("expand", "v1", detect_language(instruction))
            content = template.render(instruction=instruction)
        return [[{"role": "user", "content": content}] for _ in range(self.n)]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        answer = answer_text(text, self.TAG, self.native)
        if fold_str(answer) == fold_str(row["instruction"]):
            raise ParseFailure("copy_of_seed", answer[:500])
        return {"instruction": answer}

    def check(self, entries: list[tuple[Row, dict, Any, bool]], embed: Embed | None
              ) -> list[Failure | None]:
        assert self.checks is not None
        return self.checks.check([
            Candidate(row["instruction"], values["instruction"], group, kept,
                      None if self.native else load_template(
                          "expand_fewshot" if self.few_shot else "expand", "v1",
                          detect_language(row["instruction"])).text)
            for row, values, group, kept in entries], embed)


class ExpandStepSpec(CheckedStepSpec, PAIStepSpec):
    """Instruction expansion: n new instructions of the same task type per seed row."""

    kind: Literal["expand"]
    n: int = Field(1, gt=0, le=64, description="new instructions per seed (one per generation)")
    few_shot: int = Field(
        0, ge=0, le=16,
        description="prompted mode: also show this many other seed instructions of the same "
        "batch as examples (drawn with the step's seed)",
    )
    keep_seeds: bool = Field(
        True, description="false: seed rows go to _rejects (reason seed_not_kept)"
    )
    checks: NewInstructionChecks = Field(
        default_factory=NewInstructionChecks, description="what a new instruction must be to "
        "be kept (docs/CURATION.md#checks); false: keep every parsable answer")


@step_kind(ExpandStepSpec)
class ExpandStep(LLMStep):
    @classmethod
    def make_task(cls, spec: Any, job: Any, sampling: SamplingParams) -> ExpandTask:
        native = spec.is_native(job.engines[spec.engine].model, is_native_expand_model)
        if native and spec.few_shot:
            raise JobSpecError(
                f"Step {spec.step_name!r}: few_shot needs mode: prompted; the native Instruct-Exp "
                "models take exactly one instruction."
            )
        return ExpandTask(native, spec.n, spec.few_shot, sampling.seed, spec.checks)
