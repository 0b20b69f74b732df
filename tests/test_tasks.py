"""Refine task: prompts per mode and language, robust parsing of model answers."""

from __future__ import annotations

import pytest

from augment_ray.tasks.base import ParseFailure, detect_language, extract_tagged
from augment_ray.tasks.expand import ExpandTask, is_native_expand_model
from augment_ray.tasks.pair_expand import PairExpandTask
from augment_ray.tasks.refine import RefineTask, is_native_refine_model
from augment_ray.tasks.respond import RespondTask

ROW = {"instruction": "Write a poem.", "input": None}


def test_native_mode_sends_raw_instruction_only():
    messages = RefineTask(native=True, output_column="r").prompts(ROW)[0]
    assert messages == [{"role": "user", "content": "Write a poem."}]


def test_prompted_mode_uses_versioned_template_in_the_input_language():
    task = RefineTask(native=False, output_column="r")
    english = task.prompts({"instruction": "Write a poem.", "input": "about rain"})[0][0]["content"]
    assert "Write a poem.\n\nabout rain" in english
    assert "<refined>" in english
    chinese = task.prompts({"instruction": "写一首关于春天的诗。", "input": None})[0][0]["content"]
    assert chinese.startswith("请改写下面的指令")
    assert task.template_version == "refine.v1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<refined>Write a haiku about rain.</refined>", "Write a haiku about rain."),
        ("Sure! <refined>Write a haiku</refined> hope it helps", "Write a haiku"),
        ("<refined>Write a long poem about", "Write a long poem about"),  # cut by max_tokens
        ("Refined instruction: Write a sonnet.", "Write a sonnet."),
        ('"Write a limerick."', "Write a limerick."),
        ("Write a ballad.", "Write a ballad."),
    ],
)
def test_parse_prompted(text, expected):
    assert RefineTask(native=False, output_column="r").parse(ROW, text) == {"r": expected}


@pytest.mark.parametrize("text", ["", "   ", "<refined></refined>", "Refined instruction:"])
def test_parse_empty_is_a_failure(text):
    with pytest.raises(ParseFailure) as info:
        RefineTask(native=False, output_column="r").parse(ROW, text)
    assert info.value.reason == "empty_output"


def test_native_model_detection():
    assert is_native_refine_model("alibaba-pai/Qwen2-1.5B-Instruct-Refine")
    assert is_native_refine_model("/models/qwen2-7b-instruct-refine")
    assert not is_native_refine_model("Qwen/Qwen2.5-7B-Instruct")
    assert not is_native_refine_model("bundled")


def test_language_and_tags():
    assert detect_language("请把这段话翻译成英文") == "zh"
    assert detect_language("Translate this: 你好") == "en"
    assert detect_language("12345") == "en"
    assert detect_language("한국어로 대답하세요") == "en"  # Han counts, not every CJK script
    assert detect_language("𠀀𠀁是什么") == "zh"  # Han beyond the BMP (curate.words.HAN)
    assert extract_tagged("no tags", "refined") is None



# ---- expand ----------------------------------------------------------------------------------



def test_expand_native_sends_the_raw_instruction_n_times():
    messages = ExpandTask(native=True, n=3).prompts({"instruction": "Sort these numbers."})
    assert messages == [[{"role": "user", "content": "Sort these numbers."}]] * 3


def test_expand_prompted_golden_message():
    [[message]] = ExpandTask(native=False, n=1).prompts({"instruction": "Sort 3, 1, 2."})
    assert message["role"] == "user"
    assert message["content"] == (
        "Write one new instruction of the same task type as the example below, with different "
        "content (another topic, other entities or numbers). It must be self-contained and "
        "answerable, in the same language as the example. Do not answer it.\n\n"
        "Example instruction:\nSort 3, 1, 2.\n\n"
        "Write only the new instruction, between <instruction> and </instruction>."
    )
    [[chinese]] = ExpandTask(native=False, n=1).prompts({"instruction": "把这些数字排序。"})
    assert chinese["content"].startswith("请写一条") and "把这些数字排序。" in chinese["content"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<instruction>Sort 9, 4, 7.</instruction>", "Sort 9, 4, 7."),
        ("<instruction>Sort 9, 4", "Sort 9, 4"),
        ("New instruction: Sort 5, 2.", "Sort 5, 2."),
        # a seed that itself contains the tags does not confuse parsing of the answer
        ("<instruction>Explain what <b> does in HTML.</instruction> trailing",
         "Explain what <b> does in HTML."),
    ],
)
def test_expand_parse(text, expected):
    assert ExpandTask(native=False, n=1).parse({"instruction": "x"}, text) == {
        "instruction": expected
    }


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty_output"), ("<instruction> </instruction>", "empty_output"),
     ("<instruction>sort  3, 1, 2.</instruction>", "copy_of_seed")],
)
def test_expand_parse_failures(text, reason):
    with pytest.raises(ParseFailure) as info:
        ExpandTask(native=False, n=1).parse({"instruction": "Sort 3, 1, 2."}, text)
    assert info.value.reason == reason


def test_native_expand_model_detection():
    assert is_native_expand_model("alibaba-pai/Qwen2-7B-Instruct-Exp")
    assert is_native_expand_model("/m/Qwen2-1.5B-Instruct-Exp")
    assert not is_native_expand_model("alibaba-pai/Qwen2-7B-Instruct-Response-Exp")
    assert not is_native_expand_model("alibaba-pai/Qwen2-7B-Instruct-Refine")


# ---- respond ---------------------------------------------------------------------------------


def test_respond_prompt_is_the_instruction_and_its_input():
    task = RespondTask("instruction", "respond_previous_output")
    assert task.prompts({"instruction": "Translate.", "input": "Bonjour"}) == [
        [{"role": "user", "content": "Translate.\n\nBonjour"}]
    ]
    assert task.prompts({"instruction": "Say hi.", "input": None}) == [
        [{"role": "user", "content": "Say hi."}]
    ]
    refined = RespondTask("refined_instruction", "p")
    assert refined.prompts({"refined_instruction": "Say hi twice.", "instruction": "Say hi."}) == [
        [{"role": "user", "content": "Say hi twice."}]
    ]


def test_respond_parse_keeps_previous_and_refuses_empty():
    task = RespondTask("instruction", "p")
    assert task.parse({"output": "old"}, "  ### Response\n\nnew  ") == {
        "output": "### Response\n\nnew", "p": "old",
    }
    with pytest.raises(ParseFailure):
        task.parse({"output": "old"}, "   ")
    with pytest.raises(ParseFailure) as info:
        task.prompts({"instruction": " ", "input": None})
    assert info.value.reason == "missing_instruction"


# ---- pair_expand -----------------------------------------------------------------------------

POOL = [
    {"id": "a", "instruction": "Add 2 and 3.", "output": "5"},
    {"id": "b", "instruction": "Add 4 and 4.", "output": "8"},
    {"id": "c", "instruction": "Add 1 and 9.", "output": "10"},
    {"id": "d", "instruction": "No answer yet.", "output": None},
]


def pair_task(native: bool, k: int = 2, n: int = 1) -> PairExpandTask:
    task = PairExpandTask(native=native, k=k, n=n, seed=0)
    task.with_batch(POOL)
    return task


def test_pair_expand_native_golden_text():
    [[message]] = pair_task(native=True, k=1).prompts(POOL[0])
    assert message == {
        "role": "user",
        "content": "### Instruction\n\nAdd 2 and 3.\n\n### Response\n\n5",
    }
    [[two]] = pair_task(native=True, k=2).prompts(POOL[0])
    first, second = two["content"].split("\n\n### Instruction\n\n")
    assert first == "### Instruction\n\nAdd 2 and 3.\n\n### Response\n\n5"
    assert second in ("Add 4 and 4.\n\n### Response\n\n8", "Add 1 and 9.\n\n### Response\n\n10")


def test_pair_expand_examples_are_deterministic_and_skip_rows_without_output():
    assert pair_task(True, k=3).prompts(POOL[1]) == pair_task(True, k=3).prompts(POOL[1])
    assert "No answer yet." not in pair_task(True, k=4).prompts(POOL[0])[0][0]["content"]
    assert pair_task(True).prompts(POOL[3]) == []  # no response: used by no prompt
    assert len(pair_task(True, n=3).prompts(POOL[0])) == 3


def test_pair_expand_prompted_template():
    [[message]] = pair_task(native=False, k=1).prompts(POOL[0])
    assert message["content"].startswith("Here are example instruction-response pairs:\n\n"
                                          "### Instruction\n\nAdd 2 and 3.")
    assert message["content"].endswith("between <response> and </response>.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("### Instruction\n\nAdd 6 and 7.\n\n### Response\n\n13",
         ("Add 6 and 7.", "13")),
        # the native model often continues right after the prompt, without the header
        ("Add 6 and 7.\n\n### Response\n\n13\n\n### Instruction\n\nAdd 1 and 1.",
         ("Add 6 and 7.", "13")),
        ("<instruction>Add 6 and 7.</instruction>\n<response>13</response>",
         ("Add 6 and 7.", "13")),
        # an instruction that itself talks about '### Response' is safe inside tags
        ("<instruction>What does '### Response' mark?</instruction><response>The answer."
         "</response>", ("What does '### Response' mark?", "The answer.")),
    ],
)
def test_pair_expand_parse(text, expected):
    values = pair_task(native=True).parse(POOL[0], text)
    assert (values["instruction"], values["output"]) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "unparsable_pair"), ("Just some text.", "unparsable_pair"),
     ("### Instruction\n\n\n\n### Response\n\n5", "unparsable_pair"),
     ("### Instruction\n\nadd 2 and  3.\n\n### Response\n\n5", "copy_of_seed")],
)
def test_pair_expand_parse_failures(text, reason):
    with pytest.raises(ParseFailure) as info:
        pair_task(native=True).parse(POOL[0], text)
    assert info.value.reason == reason


def test_expand_few_shot_shows_the_seed_first_then_seeded_examples():
    pool = [{"id": f"r{i}", "instruction": f"Task {i}."} for i in range(6)]
    task = ExpandTask(native=False, n=1, few_shot=2, seed=5)
    task.with_batch(pool)
    [[message]] = task.prompts(pool[0])
    lines = message["content"].splitlines()
    assert lines[0] == "Here are example instructions from one dataset:"
    assert lines[1] == "1. Task 0."
    assert lines[2].startswith("2. Task ") and lines[3].startswith("3. Task ")
    assert "Task 0." not in lines[2] + lines[3]
    again = ExpandTask(native=False, n=1, few_shot=2, seed=5)
    again.with_batch(pool)
    assert again.prompts(pool[0]) == task.prompts(pool[0])
    assert task.template_version == "expand_fewshot.v1"
