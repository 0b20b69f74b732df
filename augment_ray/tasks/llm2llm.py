"""LLM2LLM tasks: the student answers a seed, a judge grades an answer, the teacher writes a new
example like a seed the student got wrong (validated per task kind).

A conversation seed asks its last answered user turn, given the turns before it (tasks.judge's
asked_turns): the student answers that as a chat, and is graded against the row's `output`,
the conversation's last assistant turn."""

from __future__ import annotations

import re

from augment_ray.curate.confidence import final_number
from augment_ray.curate.text import fold_str
from augment_ray.tasks.base import (
    Messages,
    ParseFailure,
    Row,
    detect_language,
    extract_tagged,
    load_template,
)
from augment_ray.tasks.judge import answer_messages, asked_turns, judged_text, yes_no_answer

PREDICTION = "student_prediction"
JUDGE_VERDICT = "judge_verdict"


def find_label(text: str, labels: list[str]) -> str | None:
    """The allowed label a text names: the whole text, else the first label that appears in
    it as a word (longer labels first, so 'not spam' wins over 'spam')."""
    folded = fold_str(text).strip(" .!\"'`*")
    by_length = sorted(labels, key=len, reverse=True)
    for label in by_length:
        if folded == fold_str(label):
            return label
    hits = []
    for label in by_length:
        match = re.search(rf"(?<!\w){re.escape(fold_str(label))}(?!\w)", folded)
        if match:
            hits.append((match.start(), label))
    return min(hits)[1] if hits else None


_QUESTION_LABEL = re.compile(
    r"^\W*(?:new\s+)?(?:problem|question|instruction|text|题目|问题|指令|文本)\s*[:\uff1a]",
    re.IGNORECASE | re.MULTILINE)
_ANSWER_LABEL = re.compile(
    r"^\W*(?:solution|answer|response|label|解答|答案|回答|标签)\s*[:\uff1a]",
    re.IGNORECASE | re.MULTILINE)
_FINAL_LINE_END = re.compile(r"(####[^\n]*)[\s\S]*$")


def split_labelled(text: str) -> tuple[str | None, str | None]:
    """('Problem: ...', 'Solution: ...') written as labelled blocks instead of tags."""
    question = _QUESTION_LABEL.search(text)
    answer = _ANSWER_LABEL.search(text, question.end() if question else 0)
    if not question or not answer:
        return None, None
    return text[question.end():answer.start()].strip() or None, text[answer.end():].strip()


def seed_questions(row: Row) -> list[str]:
    """What a seed asks: its instruction, and a conversation's last asked user turn."""
    asked = asked_turns(row) or []
    last = next((t["content"] for t in reversed(asked) if t["role"] == "user"), None)
    return [row["instruction"], *([last] if last else [])]


class PredictTask:
    """The student's answer to a seed instruction (never rejected: an empty answer is wrong)."""

    generates_rows = False
    template_version = "respond.v1"
    output_columns = (PREDICTION,)

    def prompts(self, row: Row) -> list[Messages]:
        return [answer_messages(row)]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        return {PREDICTION: text.strip()}


class JudgeGradeTask:
    """An LLM judge says whether the student's answer matches the reference (grader llm_judge)."""

    generates_rows = False
    template_version = "grade_judge.v1"
    output_columns = (JUDGE_VERDICT,)

    def prompts(self, row: Row) -> list[Messages]:
        question = judged_text(row)
        template = load_template("grade_judge", "v1", detect_language(question))
        content = template.render(instruction=question,
                                  reference=row.get("output") or "",
                                  prediction=row.get(PREDICTION) or "")
        return [[{"role": "user", "content": content}]]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        verdict = yes_no_answer(text)
        if verdict is None:
            raise ParseFailure("unparsable_verdict", text[:500])
        return {JUDGE_VERDICT: "yes" if verdict else "no"}


class TeacherTask:
    """m new examples per wrong seed, each a labelled 'Problem: ... Solution: ...' pair (or
    <question>/<answer> tags) validated for the task: math answers end in '#### N',
    classification answers are an allowed label."""

    generates_rows = True
    output_columns = ("instruction", "output")

    def __init__(self, task: str, per_wrong: int, labels: list[str] | None = None) -> None:
        self.task = task
        self.per_wrong = per_wrong
        self.labels = labels or []
        self.template_version = f"llm2llm_{task}.v1"

    def prompts(self, row: Row) -> list[Messages]:
        question = judged_text(row)
        template = load_template(f"llm2llm_{self.task}", "v1", detect_language(question))
        content = template.render(instruction=question,
                                  response=row.get("output") or "",
                                  labels=", ".join(self.labels))
        return [[{"role": "user", "content": content}] for _ in range(self.per_wrong)]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        question, answer = extract_tagged(text, "question"), extract_tagged(text, "answer")
        if not question or answer is None:
            # small models often echo the prompt's own layout instead of the tags
            question, answer = split_labelled(text)
        if not question or answer is None:
            raise ParseFailure("unparsable_example", text[:500])
        if self.task == "math":
            answer = _FINAL_LINE_END.sub(r"\1", answer)  # drop chatter after '#### N'

        if fold_str(question) in {fold_str(seed) for seed in seed_questions(row)}:
            raise ParseFailure("copy_of_seed", question[:500])
        if self.task == "math":
            if "####" not in answer or final_number(answer.split("####")[-1]) is None:
                raise ParseFailure("missing_final_answer", answer[:500])
        elif self.task == "classification":
            label = find_label(answer, self.labels)
            if label is None:
                raise ParseFailure("label_not_allowed", answer[:500])
            answer = label
        elif not answer.strip():
            raise ParseFailure("empty_output", text[:500])
        return {"instruction": question, "output": answer}
