"""The conversation contract (augment_ray/conversations.py) and what curation steps read of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from augment_ray.config.base import NormalizeSpec
from augment_ray.conversations import (
    BadConversation,
    apply_text_columns,
    conversation_array,
    conversation_from,
    exchanges,
    judged_turns,
    side_text,
)
from augment_ray.curate.text import joined_text, text_columns

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = {"role": "system", "content": "Be brief."}
Q1, A1 = {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}
Q2, A2 = {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": "2"}


@pytest.mark.parametrize(("value", "layout", "reason", "detail"), [
    ([], "messages", "empty_conversation", "no turns"),
    ("hello", "messages", "not_a_conversation", "got str"),
    ([SYSTEM], "messages", "empty_conversation", "no user turn"),
    ([Q1, {"role": "tool", "content": "x"}], "messages", "unknown_role", "turn 2 has role 'tool'"),
    ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], "sharegpt",
     "unknown_role", "turn 2 is from 'bot'"),
    ([Q1, {"role": "assistant", "content": "  "}], "messages", "empty_turn",
     "turn 2 (assistant) has no text"),
    ([Q1, A1, A2], "messages", "not_alternating", "turn 3 is assistant where user"),
    ([Q1, A1, SYSTEM, Q2], "messages", "misplaced_system", "turn 3 is a system turn"),
    ([A1, Q1], "messages", "not_alternating", "turn 1 is assistant"),
    (["q", ""], "turns", "empty_turn", "turn 2 (user) has no text"),
    ([Q1, "x"], "messages", "not_a_conversation", "turn 2 is str"),
])
def test_a_bad_conversation_is_named_by_its_turn(value, layout, reason, detail):
    with pytest.raises(BadConversation) as caught:
        conversation_from(value, layout)
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def test_layouts_give_the_same_turns():
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a "
                "prime."}, {"from": "gpt", "value": "7"}, {"from": "human", "value": "And an "
                "even one?"}]
    assert conversation_from(sharegpt, "sharegpt") == [SYSTEM, Q1, A1, Q2]
    assert conversation_from([SYSTEM, Q1, A1, Q2], "messages") == [SYSTEM, Q1, A1, Q2]
    # questions only (MT-Bench): user turns awaiting answers
    assert conversation_from(["q1", "q2"], "turns") == [
        {"role": "user", "content": "q1"}, {"role": "user", "content": "q2"}]
    assert exchanges([SYSTEM, Q1, A1, Q2]) == [("Name a prime.", "7"), ("And an even one?", None)]


def test_judge_sees_the_turns_before_the_last_answer():
    assert judged_turns([SYSTEM, Q1, A1, Q2, A2]) == ([SYSTEM, Q1, A1, Q2], "2")
    assert judged_turns([Q1]) == ([Q1], None)


def test_text_columns_go_back_into_the_turns():
    turns = apply_text_columns([SYSTEM, Q1, A1, Q2, A2], "Name a prime below 10.", "4")
    assert [t["content"] for t in turns] == ["Be brief.", "Name a prime below 10.", "7",
                                             "And an even one?", "4"]
    assert apply_text_columns([Q1], None, "ignored: no answer to replace") == [Q1]


def conversation_table() -> pa.Table:
    return pa.table({
        "instruction": ["Name a prime.", "single question"],
        "input": [None, "some context"],
        "output": ["2", "single answer"],
        "messages": conversation_array([[SYSTEM, Q1, A1, Q2, A2], None]),
    })


def test_curation_reads_every_turn_of_a_conversation():
    table = conversation_table()
    instruction, context, output, whole = text_columns(
        table, ["instruction", "input", "output", "messages"], "dedup")
    assert instruction.to_pylist() == ["Name a prime.\nAnd an even one?", "single question"]
    assert context.to_pylist() == [None, "some context"]
    assert output.to_pylist() == ["7\n2", "single answer"]
    assert whole.to_pylist() == [
        "system: Be brief.\nuser: Name a prime.\nassistant: 7\nuser: And an even one?\n"
        "assistant: 2", None]
    folded = joined_text(table, ["instruction", "input"], NormalizeSpec(), "dedup")
    assert folded.to_pylist() == ["name a prime. and an even one?", "single question some context"]


def test_side_text_of_an_empty_or_all_single_turn_block():
    assert side_text(conversation_array([]), "user").to_pylist() == []
    assert side_text(conversation_array([None, None]), "user").to_pylist() == [None, None]
    table = pa.table({"instruction": ["q"], "messages": pa.nulls(1)})  # Ray Data's null type
    [column] = text_columns(table, ["instruction"], "filter")
    assert column.to_pylist() == ["q"]


# ---- curation steps on conversations, through the CLI ------------------------------------------

LONG_ANSWER = ("Seven is prime because its only divisors are one and itself, and no other whole "
               "number divides it evenly.")


def chat(first: str, answer: str, second: str = "Why?", second_answer: str = LONG_ANSWER
         ) -> list[dict[str, str]]:
    return [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
            {"role": "user", "content": second}, {"role": "assistant", "content": second_answer}]


def test_curation_steps_run_on_conversations_through_the_cli(tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq
    import yaml

    first = "Name a prime number between five and ten and explain what makes it prime please."
    records = [
        {"key": "kept", "messages": chat(first, "Seven is one.")},
        # the same user turns, other answers: an exact duplicate on the user side
        {"key": "exact_dup", "messages": chat(first, "It is seven.", second_answer=LONG_ANSWER
                                                + " Indeed.")},
        # same opening, another follow-up: not a duplicate of either
        {"key": "other_follow_up", "messages": chat(
            first, "Seven is one.", "Now list every prime number between one hundred and two "
            "hundred, and show how you checked each one.", "101, 103, 107 and more.")},
        # one word changed in the user turns: a near duplicate
        {"key": "near_dup", "messages": chat(first.replace("please", "now"), "Seven.")},
        # the second answer is a refusal: the response rules read every assistant turn
        {"key": "refusal", "messages": chat("Tell me about the prime numbers below twenty.",
                                            "Two, three, five, seven and more.", "Write more.",
                                            "As an AI language model, I cannot help with that.")},
        # an MT-Bench question as its second turn: contaminated
        {"key": "contaminated", "messages": chat(
            "Hello there, I have a writing task for you.", "Sure, go ahead.",
            "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
            "cultural experiences and must-see attractions.", "Aloha! " + LONG_ANSWER)},
    ]
    source = tmp_path / "in" / "chats.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    job = {"name": "curate-conversations", "input": {"uri": str(source)},
           "output": {"uri": str(out)},
           "steps": [
               {"kind": "filter", "reject_refusals": True, "min_response_chars": 5},
               {"kind": "decontaminate", "columns": ["instruction"], "ngram": 8, "threshold": 0.5,
                "eval_sets": [{"name": "mt_bench", "uri": str(
                    ROOT / "jobs/data/eval/mt_bench_questions.jsonl"), "columns": ["turns"]}]},
               {"kind": "dedup_exact", "columns": ["instruction"]},
               {"kind": "dedup_near", "columns": ["instruction"], "shingle": "char",
                "shingle_size": 5, "threshold": 0.8},
           ]}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    data = pq.read_table(sorted((out / "data").glob("*.parquet")))
    rejects = pa.concat_tables([pq.read_table(f) for f in sorted(
        (out / "_rejects").glob("*.parquet"))], promote_options="default")
    reasons = {row["key"]: (row["reject_step"], row["reject_reason"])
               for row in rejects.to_pylist()}
    assert reasons.pop("refusal") == ("filter", "refusal")
    assert reasons.pop("contaminated") == ("decontaminate", "contaminated")
    # dedup keeps the lowest id of a group: which of the two that is depends on the ids
    by_step = {step: key for key, (step, _) in reasons.items()}
    assert sorted(reasons.values()) == [("dedup_exact", "exact_duplicate"),
                                        ("dedup_near", "near_duplicate")]
    assert by_step["dedup_exact"] in ("kept", "exact_dup")
    assert by_step["dedup_near"] in ("kept", "exact_dup", "near_dup")
    kept = {row["key"]: row["messages"] for row in data.to_pylist()}
    assert len(kept) == 2 and "other_follow_up" in kept  # same opening, another follow-up
    assert len(data) + len(rejects) == len(records)
    for key, turns in kept.items():  # the turns come out as they went in
        assert turns == next(r["messages"] for r in records if r["key"] == key)
