"""Instruction refinement (PAI Instruct-Refine): make an instruction more specific and helpful."""

from __future__ import annotations

import re

from augment_ray.tasks.base import Messages, Row, answer_text, detect_language, load_template

# alibaba-pai/Qwen2-1.5B-Instruct-Refine, alibaba-pai/Qwen2-7B-Instruct-Refine, local copies
NATIVE_REFINE_MODEL = re.compile(r"qwen2-(1\.5|7)b-instruct-refine", re.IGNORECASE)


def is_native_refine_model(model: str) -> bool:
    return bool(NATIVE_REFINE_MODEL.search(model))


class RefineTask:
    TAG = "refined"

    def __init__(self, native: bool, output_column: str) -> None:
        self.native = native
        self.output_column = output_column
        self.output_columns = (output_column,)
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
