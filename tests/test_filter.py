"""The filter step's rules: measured values, boundaries, rule order, nulls, unicode, columns.

The whole filter step running in a real Ray job is in tests/test_decontaminate.py (one job runs
filter then decontaminate, to start Ray once)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.config.job import parse_job
from augment_ray.curate.filters import (
    DEFAULT_REFUSAL_PHRASES,
    RULE_ORDER,
    filter_table,
    fold_text,
    repeated_ngram_counts,
)
from augment_ray.curate.words import token_counts
from augment_ray.errors import InputDataError, JobSpecError
from augment_ray.kinds import build_steps
from augment_ray.steps.filter import FilterStepSpec

ALL_OFF = {
    "max_repeated_ngram_ratio": None, "max_non_printable_ratio": None,
    "reject_refusals": False, "reject_empty_response": False,
    "reject_response_equals_instruction": False,
}


def spec(**fields) -> FilterStepSpec:
    """A filter with only the given rules on (every default rule off unless named)."""
    return FilterStepSpec(kind="filter", **{**ALL_OFF, **fields})


def rows(instruction: list, output: list | None = None, input: list | None = None,
         **extra: list) -> pa.Table:
    n = len(instruction)
    columns = {
        "id": [f"r{i}" for i in range(n)],
        "instruction": pa.array(instruction, pa.string()),
        "input": pa.array(input if input is not None else [None] * n, pa.string()),
    }
    if output is not None:
        columns["output"] = pa.array(output, pa.string())
    columns.update(extra)
    columns.update({
        "reject_step": pa.nulls(n, pa.string()), "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })
    return pa.table(columns)


def verdicts(table: pa.Table, filter_spec: FilterStepSpec) -> list[tuple]:
    out = filter_table(table, filter_spec, "filter")
    return [(r["reject_reason"], r["reject_detail"]) for r in out.to_pylist()]


def reasons(table: pa.Table, filter_spec: FilterStepSpec) -> list[str | None]:
    return [reason for reason, _ in verdicts(table, filter_spec)]


# ------------------------------------------------------------------ length rules


def test_prompt_chars_count_instruction_plus_input_with_inclusive_limits():
    table = rows(["a" * 300, "a" * 300, "a" * 9, "a" * 10],
                 output=["ok"] * 4, input=["b" * 112, "b" * 100, None, ""])
    assert verdicts(table, spec(min_chars=10, max_chars=400)) == [
        ("max_chars", "412 chars > max_chars 400"),
        (None, None),  # exactly 400 is allowed
        ("min_chars", "9 chars < min_chars 10"),
        (None, None),  # exactly 10
    ]


def test_response_chars_and_unicode_counts_code_points():
    table = rows(["q"] * 4, output=["数学题很难", "数学题", "ab", "é" * 6])
    assert verdicts(table, spec(min_response_chars=3, max_response_chars=5)) == [
        (None, None),  # 5 CJK characters, not 15 UTF-8 bytes
        (None, None),
        ("min_response_chars", "2 chars < min_response_chars 3"),
        ("max_response_chars", "6 chars > max_response_chars 5"),
    ]


def test_tokens_are_words_and_punctuation_marks_and_cjk_characters():
    counts = token_counts(pa.array(["Hello, world!", "你好世界", "it's 3.5 km", None, "",
                                    "Café au lait — 🙂 ok"]))
    assert counts.tolist() == [4, 4, 7, 0, 0, 6]


def test_token_limits_count_the_whole_row():
    # "Add 2 and 3." (5) + "" + "5" (1) = 6 tokens
    table = rows(["Add 2 and 3.", "Add 2 and 3.", "Hi"], output=["5", "It is 5, of course.", None])
    assert verdicts(table, spec(min_tokens=2, max_tokens=6)) == [
        (None, None),
        ("max_tokens", "12 tokens > max_tokens 6"),
        ("min_tokens", "1 token < min_tokens 2"),
    ]


# ------------------------------------------------------------------ content rules


def test_repeated_ngram_counts_fold_case_and_punctuation():
    total, repeated = repeated_ngram_counts(fold_text(pa.array([
        "the cat sat the cat sat the cat sat on the mat",  # 10 3-grams, 6 distinct
        "The cat sat. THE  CAT, sat!",  # the same 3-gram twice after folding
        "a b",  # fewer than 3 words: no 3-grams
        None,
        "好好学习好好学习",  # each CJK character is a word
    ])))
    assert total.tolist() == [10, 4, 0, 0, 6]
    assert repeated.tolist() == [4, 1, 0, 0, 2]


def test_repeated_ngrams_checks_instruction_then_response_with_exclusive_limit():
    loop = "the cat sat the cat sat the cat sat on the mat"  # 40% repeats
    table = rows(["Describe the cat.", loop, loop], output=[loop, "Fine.", "Fine."])
    assert verdicts(table, spec(max_repeated_ngram_ratio=0.3))[:2] == [
        ("repeated_ngrams",
         "response: 4 of 10 word 3-grams (40%) repeat > max_repeated_ngram_ratio 0.3"),
        ("repeated_ngrams",
         "instruction: 4 of 10 word 3-grams (40%) repeat > max_repeated_ngram_ratio 0.3"),
    ]
    assert reasons(table, spec(max_repeated_ngram_ratio=0.4)) == [None, None, None]


def test_non_printable_ratio_ignores_tabs_and_newlines():
    table = rows(["ab\x00\x01", "line one\n\tline two", "x" * 9 + "\ufffd", "q"],
                 output=["cd", "ok", None, "\ue000" * 3])
    assert verdicts(table, spec(max_non_printable_ratio=0.1)) == [
        ("non_printable",
         "2 of 6 chars (33.3%) are non-printable > max_non_printable_ratio 0.1"),
        (None, None),
        (None, None),  # 1 of 10 is exactly the limit
        ("non_printable",
         "3 of 4 chars (75.0%) are non-printable > max_non_printable_ratio 0.1"),
    ]


def test_refusals_match_folded_phrases_in_the_response_only():
    table = rows(
        ["Write a poem.", "Write a poem.", "Say: I am unable to sleep.", "Explain RAID."],
        output=["I\u2019m sorry, but I   CANNOT write that.",
                "As an AI language model, I have no feelings. Here is a poem.",
                "Sure.",
                "RAID combines disks for redundancy."],
    )
    assert verdicts(table, spec(reject_refusals=True)) == [
        ("refusal", "response contains refusal phrase \"i'm sorry, but i cannot\""),
        ("refusal", "response contains refusal phrase 'as an ai language model'"),
        (None, None),  # the phrase is in the instruction, not the response
        (None, None),
    ]
    both = rows(["q"], output=["I'm sorry, but I cannot. As an AI language model, I refuse."])
    assert verdicts(both, spec(reject_refusals=True)) == [  # the first phrase of the list
        ("refusal", "response contains refusal phrase 'as an ai language model'"),
    ]
    custom = spec(reject_refusals=True, refusal_phrases=["Redundancy"])
    assert reasons(table, custom) == [None, None, None, "refusal"]  # replaces the defaults
    assert "i am unable to" in DEFAULT_REFUSAL_PHRASES


def test_empty_response_tells_null_from_blank():
    table = rows(["q1", "q2", "q3"], output=[None, " \n\t ", "a"])
    assert verdicts(table, spec(reject_empty_response=True)) == [
        ("empty_response", "response is null"),
        ("empty_response", "response is blank"),
        (None, None),
    ]


def test_response_equal_to_instruction_after_nfkc_case_and_space_folding():
    table = rows(["Say hi.", "Say hi.", "Say hi.", "Say hi."],
                 output=["  SAY   hi. ", "\uff33\uff41\uff59 hi.", "Hi!", ""])
    assert reasons(table, spec(reject_response_equals_instruction=True)) == [
        "response_equals_instruction", "response_equals_instruction", None, None,
    ]


# ------------------------------------------------------------------ order and pass-through


def test_the_first_failing_rule_in_the_documented_order_wins():
    assert RULE_ORDER.index("refusal") < RULE_ORDER.index("min_response_chars")
    everything = FilterStepSpec(kind="filter", min_response_chars=100, max_tokens=3)
    table = rows(["Tell me a joke.", "Tell me a joke.", "Tell me a joke."],
                 output=["I cannot fulfill that.", "Short.", None])
    assert reasons(table, everything) == ["refusal", "min_response_chars", "empty_response"]


def test_rows_rejected_earlier_pass_through_untouched():
    table = rows(["q", "q"], output=[None, None])
    table = table.set_column(table.schema.get_field_index("reject_step"), "reject_step",
                             pa.array(["input", None]))
    table = table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason",
                             pa.array(["too_long", None]))
    out = filter_table(table, FilterStepSpec(kind="filter"), "filter").to_pylist()
    assert (out[0]["reject_step"], out[0]["reject_reason"]) == ("input", "too_long")
    assert (out[1]["reject_step"], out[1]["reject_reason"]) == ("filter", "empty_response")
    assert [r["id"] for r in out] == ["r0", "r1"]  # nothing dropped or added
    assert out[0].keys() == table.to_pylist()[0].keys()  # no new columns


# ------------------------------------------------------------------ columns and types


def test_response_rules_are_skipped_when_the_rows_have_no_response_column():
    table = rows(["Tell me a joke.", "x"], output=None)
    assert reasons(table, FilterStepSpec(kind="filter", min_response_chars=5)) == [None, None]
    answer = FilterStepSpec(kind="filter", response_column="answer", min_chars=2)
    assert reasons(table, answer) == [None, "min_chars"]  # prompt rules still apply


def test_missing_instruction_column_names_the_step_and_column():
    table = rows(["q"], output=["a"])
    with pytest.raises(InputDataError, match=r"'filter'.*'prompt'.*instruction_column"):
        filter_table(table, FilterStepSpec(kind="filter", instruction_column="prompt"),
                     "filter")


def test_non_text_response_column_is_a_clear_error():
    table = rows(["q"], score=[3])
    with pytest.raises(InputDataError, match="column 'score', which holds int64, not text"):
        filter_table(table, FilterStepSpec(kind="filter", response_column="score"), "filter")


def test_null_instruction_does_not_crash():
    table = rows([None, "ok"], output=["a", "b"])
    assert reasons(table, FilterStepSpec(kind="filter", min_chars=1)) == ["min_chars", None]


def test_an_empty_batch_passes():
    assert filter_table(rows([], output=[]), FilterStepSpec(kind="filter"), "f").num_rows == 0


# ------------------------------------------------------------------ spec and step


def job(steps: list[dict], input_uri: str = "in/") -> dict:
    return {"input": {"uri": input_uri}, "output": {"uri": "out/"}, "steps": steps}


def test_spec_refuses_min_above_max_and_blank_phrases():
    with pytest.raises(JobSpecError, match="steps\\[0\\]: min_chars 50 is above max_chars 10"):
        parse_job(job([{"kind": "filter", "min_chars": 50, "max_chars": 10}]))
    with pytest.raises(JobSpecError, match="refusal_phrases: a blank phrase"):
        parse_job(job([{"kind": "filter", "refusal_phrases": ["ok", "  "]}]))


def write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_response_rules_turn_off_when_the_input_has_no_output(tmp_path):
    """The reader gives every row an `output` column (null when the input has none), so the
    step asks the input itself; a filter must not reject instruction-only data wholesale."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Name a color."}])
    pq.write_table(pa.table({"instruction": ["Name a color."], "output": ["Red."]}),
                   tmp_path / "pairs.parquet")

    [bare] = build_steps(parse_job(job([{"kind": "filter"}], str(tmp_path / "prompts.jsonl"))))
    bare.prepare()
    assert bare.response_rules is False
    assert "empty_response" not in bare.describe()["rules"]
    assert bare.describe()["response_rules"].startswith("skipped")

    [paired] = build_steps(parse_job(job([{"kind": "filter"}], str(tmp_path / "pairs.parquet"))))
    paired.prepare()
    assert paired.response_rules is True
    assert paired.describe()["rules"][0] == "empty_response"

    engines = {"t": {"kind": "transformers"}}
    answered = parse_job({**job([{"kind": "respond", "engine": "t"}, {"kind": "filter"}],
                                str(tmp_path / "prompts.jsonl")), "engines": engines})
    _, after_respond = build_steps(answered)
    after_respond.prepare()
    assert after_respond.response_rules is True  # respond writes output
