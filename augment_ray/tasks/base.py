"""The task contract and the helpers every task shares (templates, language, tag parsing)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from augment_ray.conversations import exchanges, row_conversation
from augment_ray.curate.words import han_share
from augment_ray.engines.base import Messages

Row = dict[str, Any]


class ParseFailure(Exception):
    """The model's answer cannot be used; the row is rejected with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LLMTask(Protocol):
    template_version: str
    output_columns: tuple[str, ...]  # the keys parse() returns
    generates_rows: bool  # False: parse() fills the row's columns; True: each answer is a new row

    def prompts(self, row: Row) -> list[Messages]:
        """The generations to run for `row` (one for most tasks; n for expand)."""
        ...

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        """Column values from one answer, or raise ParseFailure."""
        ...


class MultiTurnTask(LLMTask, Protocol):
    """A task that answers a conversation row turn by turn (respond): the runner generates in
    rounds, each turn's prompt built from the answers to the turns before it. Columns in
    `conversation_columns` hold conversations (CONVERSATION_TYPE) and are written only where
    the rows carry a `messages` column."""

    conversation_columns: tuple[str, ...]

    def follow_up(self, row: Row, prompt: Messages, values: dict[str, Any]
                  ) -> tuple[dict[str, Any], Messages | None]:
        """After `values` were parsed from the answer to `prompt`: the row's values as of this
        turn, and the next turn's prompt (None: the row is done)."""
        ...


@dataclass(frozen=True)
class Template:
    name: str  # e.g. refine.v1.en
    text: str

    def render(self, **values: str) -> str:
        return self.text.format(**values)


@cache
def load_template(task: str, version: str, language: str) -> Template:
    name = f"{task}.{version}.{language}"
    text = resources.files("augment_ray.tasks").joinpath("templates", f"{name}.txt").read_text(
        encoding="utf-8"
    )
    return Template(name=name, text=text.strip())


def first_exchange(row: Row) -> tuple[str | None, str | None]:
    """The row's (instruction, response) pair: a conversation's first user turn and the answer
    to it (the row's `instruction` stands for that turn), else `instruction` and `output`."""
    turns = row_conversation(row)
    if turns is None:
        return row.get("instruction"), row.get("output")
    pairs = exchanges(turns)
    return row.get("instruction") or (pairs[0][0] if pairs else None), \
        pairs[0][1] if pairs else None


def detect_language(text: str) -> str:
    """'zh' when over 30% of the letters are Han ideographs (curate.words.HAN), else 'en'.
    Enough to pick a prompt template."""
    return "zh" if han_share(text) > 0.3 else "en"


def extract_tagged(text: str, tag: str) -> str | None:
    """The text inside <tag>...</tag>; an unclosed tag runs to the end (cut by max_tokens)."""
    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, flags=re.DOTALL | re.IGNORECASE)
    return match.group(1).strip() if match else None


def answer_text(text: str, tag: str, native: bool) -> str:
    """The answer in a model's text: all of it for a native PAI model (trained to emit just the
    answer); else the part inside <tag>, or the text cleaned of a leading label. Raises
    ParseFailure('empty_output') when nothing is left."""
    if native:
        answer = text.strip()
    else:
        tagged = extract_tagged(text, tag)
        answer = clean_answer(tagged if tagged is not None else text)
    if not answer:
        raise ParseFailure("empty_output", text[:500])
    return answer


_LEADING_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:refined|rewritten|improved|new|revised)?\s*(?:instruction|prompt|question)"
    r"\s*(?:\*\*)?\s*[:\uff1a]\s*(?:\*\*)?",
    flags=re.IGNORECASE,
)


def clean_answer(text: str) -> str:
    """Strip a leading 'Refined instruction:' style label and wrapping quotes."""
    text = _LEADING_LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text
