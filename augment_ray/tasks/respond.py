"""Response writing (distillation): a teacher model answers each instruction."""

from __future__ import annotations

from augment_ray.tasks.base import Messages, ParseFailure, Row, load_template


class RespondTask:
    generates_rows = False
    template_version = "respond.v1"

    def __init__(self, instruction_column: str, previous_output_column: str) -> None:
        self.instruction_column = instruction_column
        self.previous_output_column = previous_output_column
        self.output_columns = ("output", previous_output_column)

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
