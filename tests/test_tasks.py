"""Refine task: prompts per mode and language, robust parsing of model answers."""

from __future__ import annotations

import pytest

from augment_ray.tasks.base import ParseFailure, detect_language, extract_tagged
from augment_ray.tasks.refine import RefineTask, is_native_refine_model

ROW = {"instruction": "Write a poem.", "input": None}


def test_native_mode_sends_raw_instruction_only():
    messages = RefineTask(native=True, output_column="r").prompt(ROW)
    assert messages == [{"role": "user", "content": "Write a poem."}]


def test_prompted_mode_uses_versioned_template_in_the_input_language():
    task = RefineTask(native=False, output_column="r")
    english = task.prompt({"instruction": "Write a poem.", "input": "about rain"})[0]["content"]
    assert "Write a poem.\n\nabout rain" in english
    assert "<refined>" in english
    chinese = task.prompt({"instruction": "写一首关于春天的诗。", "input": None})[0]["content"]
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
    assert extract_tagged("no tags", "refined") is None

