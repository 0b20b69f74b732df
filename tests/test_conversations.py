"""The conversation contract (augment_ray/conversations.py) and what curation steps read of it."""

from __future__ import annotations

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
