"""Judge prompts (CLEAR / BSDetector) and the parsers of their answers.

Every prompt is a versioned template in English and Chinese, picked by the question's language.
A parser returns None for an answer it cannot read; the caller records that per row.

What a row asks, for every step that judges or answers it again (score, auto_correct, the
LLM2LLM student, grader and teacher): a single-turn row's instruction (and input); a
conversation's turns before its last assistant turn, whose answer is the row's `output`.
"""

from __future__ import annotations

import json
import math
import re

from augment_ray.conversations import (
    Turn,
    apply_text_columns,
    history_text,
    judged_turns,
    row_conversation,
)
from augment_ray.tasks.base import Messages, Row, detect_language, load_template

JUDGE_TEMPLATES = {
    "p_yes": "judge_yes_no.v1",
    "self_reflection": "reflection.v1",
    "rubric": "rubric.v1",
    "consistency": "respond.v1",
    "compare": "compare.v1",
}

# scores of the BSDetector self-reflection choices
REFLECTION_SCORES = {"A": 1.0, "B": 0.0, "C": 0.5}
RUBRIC_KEYS = ("accuracy", "helpfulness", "detail")
# engines that support guided decoding (vLLM, OpenAI-compatible servers) are held to it
RUBRIC_SCHEMA = {
    "type": "object",
    "properties": {key: {"type": "integer", "minimum": 1, "maximum": 5} for key in RUBRIC_KEYS},
    "required": list(RUBRIC_KEYS),
}

YES_TOKENS = frozenset({"yes", "y", "true", "是", "是的", "对", "正确"})
NO_TOKENS = frozenset({"no", "n", "false", "否", "不", "不是", "错误"})


def asked_turns(row: Row, instruction_column: str = "instruction") -> list[Turn] | None:
    """A conversation's turns before its last assistant turn (the answer judged: the row's
    `output`), the first user turn as `instruction_column` has it; None for a single-turn
    row."""
    turns = row_conversation(row)
    if turns is None:
        return None
    instruction = row.get(instruction_column)
    return judged_turns(apply_text_columns(turns, str(instruction) if instruction else None,
                                           None))[0]


def judged_text(row: Row, instruction_column: str = "instruction") -> str:
    """The question a row asks (what a judge or a student answers), as text: the instruction,
    plus the row's input when it has one; for a conversation its asked_turns, as 'Role: text'
    paragraphs (just the question when there is nothing before it)."""
    asked = asked_turns(row, instruction_column)
    if asked is not None:
        return asked[0]["content"] if len(asked) == 1 else history_text(asked)
    question = str(row.get(instruction_column) or "")
    context = row.get("input")
    return f"{question}\n\n{context}" if context else question


def answer_messages(row: Row, instruction_column: str = "instruction") -> Messages:
    """The prompt that answers what a row asks (consistency samples, candidate responses, a
    student's answer): a conversation's asked_turns as chat messages, else answer_prompt."""
    asked = asked_turns(row, instruction_column)
    if asked is not None and len(asked) > 1:
        return [dict(turn) for turn in asked]
    return answer_prompt(judged_text(row, instruction_column))


def _user(content: str) -> Messages:
    return [{"role": "user", "content": content}]


def _render(template: str, question: str, **values: str) -> str:
    name, version = template.split(".")
    return load_template(name, version, detect_language(question)).render(
        question=question, **values
    )


def yes_no_prompt(question: str, answer: str) -> Messages:
    return _user(_render("judge_yes_no.v1", question, answer=answer))


def reflection_prompt(question: str, answer: str) -> Messages:
    return _user(_render("reflection.v1", question, answer=answer))


def reflection_followup(first: Messages, first_answer: str, question: str) -> Messages:
    """BSDetector's second question, asked in the same conversation after the first answer."""
    again = load_template("reflection_sure", "v1", detect_language(question)).render()
    return [*first, {"role": "assistant", "content": first_answer}, {"role": "user",
                                                                      "content": again}]


def rubric_prompt(question: str, answer: str) -> Messages:
    return _user(_render("rubric.v1", question, answer=answer))


def answer_prompt(question: str) -> Messages:
    """The judge answers the question itself (consistency samples, candidate responses)."""
    content = load_template("respond", "v1", "any").render(instruction=question, context="")
    return _user(content.strip())


def compare_prompt(question: str, first: str, second: str) -> Messages:
    """Asks whether `second` is better than `first`."""
    return _user(_render("compare.v1", question, first=first, second=second))


# ------------------------------------------------------------------------------ parsers


def _token_word(token: str) -> str:
    """' Yes', 'YES.', '**yes' -> 'yes': what a token says, without spacing, case and marks."""
    return re.sub(r"[\W_]+", "", token).lower()


def yes_no_answer(text: str) -> bool | None:
    """True/False when an answer's first word is a Yes/No variant, else None."""
    match = re.match(r"\W*(\w+)", text)
    word = _token_word(match.group(1)) if match else ""
    return True if word in YES_TOKENS else False if word in NO_TOKENS else None


def yes_probability(top: dict[str, float]) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from one step's top logprobs, adding up the variants of each
    word (' Yes', 'Yes', 'yes', '是'). None when neither word is among the top tokens."""
    yes = no = 0.0
    for token, logprob in top.items():
        word = _token_word(token)
        if word in YES_TOKENS:
            yes += math.exp(logprob)
        elif word in NO_TOKENS:
            no += math.exp(logprob)
    if yes + no == 0.0:
        return None
    return yes / (yes + no)


def yes_probability_of(steps: tuple[dict[str, float], ...] | None) -> float | None:
    """P(Yes) at the answer's first step that puts Yes or No on top; else at the first step
    where either appears at all (a model may open with a space, quote or '**')."""
    if not steps:
        return None
    fallback = None
    for top in steps:
        value = yes_probability(top)
        if value is None:
            continue
        best = max(top, key=top.__getitem__)
        if _token_word(best) in YES_TOKENS | NO_TOKENS:
            return value
        if fallback is None:
            fallback = value
    return fallback


# \uff1a \uff08 \uff09: fullwidth colon and parentheses, as Chinese answers write them
_ANSWER_LETTER = re.compile(r"answer\s*[:\uff1a]?\s*[\[(\uff08]?\s*([ABC])\b", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\W*([ABC])(?:\W|$)")
_BRACKETED_LETTER = re.compile(r"[(\uff08]([ABC])[)\uff09]")
_CHOICE_WORDS = (  # checked in this order: "not sure" and "incorrect" contain "correct"
    ("C", re.compile(r"not sure|unsure|uncertain|不确定", re.IGNORECASE)),
    ("B", re.compile(r"incorrect|not correct|wrong|错误|不正确", re.IGNORECASE)),
    ("A", re.compile(r"\bcorrect\b|正确", re.IGNORECASE)),
)


def reflection_choice(text: str) -> str | None:
    """The letter (A correct, B incorrect, C not sure) in a self-reflection answer."""
    for pattern in (_ANSWER_LETTER, _LEADING_LETTER):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    letters = {m.upper() for m in _BRACKETED_LETTER.findall(text)}
    if len(letters) == 1:
        return letters.pop()
    for letter, pattern in _CHOICE_WORDS:
        if pattern.search(text):
            return letter
    return None


def reflection_choice_from_logprobs(steps: tuple[dict[str, float], ...] | None) -> str | None:
    """The most likely of A/B/C at the first step that offers any of them."""
    for top in steps or ():
        mass: dict[str, float] = {}
        for token, logprob in top.items():
            word = _token_word(token).upper()
            if word in REFLECTION_SCORES:
                mass[word] = mass.get(word, 0.0) + math.exp(logprob)
        if mass:
            return max(mass, key=mass.__getitem__)
    return None


_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def rubric_scores(text: str) -> dict[str, float] | None:
    """{accuracy, helpfulness, detail} each in 1..5 from a JSON answer (or a JSON-ish one:
    the first object that parses, else `"key": n` pairs). None unless all three are found."""
    found: dict[str, float] = {}
    for candidate in _JSON_OBJECT.findall(text):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            for key in RUBRIC_KEYS:
                value = data.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    found[key] = float(value)
            break
    for key in RUBRIC_KEYS:
        if key not in found:
            match = re.search(rf"{key}\W{{0,3}}[:=]\s*(\d+(?:\.\d+)?)", text, re.IGNORECASE)
            if match:
                found[key] = float(match.group(1))
    if len(found) < len(RUBRIC_KEYS):
        return None
    return {key: min(5.0, max(1.0, value)) for key, value in found.items()}
