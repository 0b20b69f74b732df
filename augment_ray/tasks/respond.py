"""Response writing (distillation): a teacher model answers each instruction, and every user
turn of a conversation, in order, each given the conversation so far with its own answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import CheckedStepSpec, LLMStepSpec
from augment_ray.conversations import MESSAGES, row_conversation, system_prompt
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import Messages, ParseFailure, Row, load_template
from augment_ray.validate.checks import Candidate, Embed, Failure, ResponseChecks


class RespondTask:
    """A single-turn row: one prompt, the instruction. A conversation row (`messages`): one
    prompt per user turn, in rounds (tasks.base.MultiTurnTask), each the conversation so far as
    chat messages: its system turn, its user turns (the first from `instruction_column`) and
    this run's answers to them, never the row's old answers."""

    generates_rows = False
    template_version = "respond.v1"

    def __init__(self, instruction_column: str, previous_output_column: str,
                 checks: ResponseChecks | None = None,
                 previous_messages_column: str = "previous_messages") -> None:
        self.checks = checks
        self.instruction_column = instruction_column
        self.previous_output_column = previous_output_column
        self.previous_messages_column = previous_messages_column
        self.output_columns = ("output", previous_output_column)
        self.conversation_columns = (MESSAGES, previous_messages_column)
        self.diversity_columns = (instruction_column, "output")

    def prompts(self, row: Row) -> list[Messages]:
        instruction = row.get(self.instruction_column)
        if not instruction or not str(instruction).strip():
            raise ParseFailure("missing_instruction", f"{self.instruction_column} is empty")
        context = row.get("input") or ""
        template = load_template("respond", "v1", "any")  # no words of its own
        content = template.render(instruction=instruction, context=context).strip()
        system = system_prompt(row_conversation(row) or [])
        return [[*([{"role": "system", "content": system}] if system else []),
                 {"role": "user", "content": content}]]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        answer = text.strip()
        if not answer:
            raise ParseFailure("empty_output", text[:500])
        return {"output": answer, self.previous_output_column: row.get("output")}

    def follow_up(self, row: Row, prompt: Messages, values: dict[str, Any]
                  ) -> tuple[dict[str, Any], Messages | None]:
        turns = row_conversation(row)
        if turns is None:
            return values, None
        conversation = [*prompt, {"role": "assistant", "content": values["output"]}]
        values = {**values, MESSAGES: conversation, self.previous_messages_column: turns}
        questions = [turn["content"] for turn in turns if turn["role"] == "user"]
        asked = sum(turn["role"] == "user" for turn in prompt)
        if asked >= len(questions):
            return values, None
        return values, [*conversation, {"role": "user", "content": questions[asked]}]

    def candidate(self, row: Row, values: dict[str, Any]) -> Candidate:
        """An answer to check against its question: a conversation's latest user turn, its
        embedding compared with every user turn so far (a follow-up such as "rewrite your
        previous answer" is off topic on its own); else the instruction."""
        conversation = values.get(MESSAGES)
        if not conversation:
            return Candidate(str(row[self.instruction_column]), values["output"])
        questions = [t["content"] for t in conversation if t["role"] == "user"]
        return Candidate(questions[-1], values["output"], topic="\n".join(questions))

    def check(self, entries: list[tuple[Row, dict, Any, bool]], embed: Embed | None
              ) -> list[Failure | None]:
        assert self.checks is not None
        return self.checks.check([self.candidate(row, values) for row, values, _, _ in entries],
                                 embed)


class RespondStepSpec(CheckedStepSpec, LLMStepSpec):
    """Writes the response to each instruction with a teacher engine (distillation). The row's
    existing response, if any, is kept in `<name>_previous_output`. A conversation gets a new
    answer to every user turn, in order (`messages`); its old turns are kept in
    `<name>_previous_messages`."""

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
                           spec.checks, f"{spec.step_name}_previous_messages")
