"""CLEAR pieces one at a time: reading P(Yes) from logprobs, parsing malformed judge answers,
answer similarity, the BSDetector combination, AUROC, and the score / auto_correct runners on
one batch with a scripted engine. (The real model runs them in tests/test_clear_job.py.)"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from augment_ray.config.base import SamplingParams
from augment_ray.curate.confidence import answer_similarity, auroc, combine, final_number
from augment_ray.engines.base import Completion, GenerationFailure
from augment_ray.engines.transformers_engine import TransformersEngineSpec
from augment_ray.steps import engine_pool
from augment_ray.steps.auto_correct import (
    CANDIDATE_PHASE,
    COMPARE_PHASE,
    AutoCorrectStepSpec,
    CorrectRunner,
    better_confidence,
    replaces,
)
from augment_ray.steps.auto_filter import Threshold
from augment_ray.steps.score import ScoreRunner, ScoreStepSpec
from augment_ray.tasks import judge


def lp(**probabilities: float) -> dict[str, float]:
    return {token.replace("_", " "): math.log(p) for token, p in probabilities.items()}


# ------------------------------------------------------------------ P(Yes) from logprobs


def test_p_yes_adds_up_token_variants_and_ignores_other_tokens():
    top = {" Yes": math.log(0.5), "Yes": math.log(0.1), "yes": math.log(0.1),
           " No": math.log(0.2), "Maybe": math.log(0.1)}
    assert judge.yes_probability(top) == pytest.approx(0.7 / 0.9)


def test_p_yes_reads_chinese_and_punctuated_variants():
    top = {"是": math.log(0.3), "Yes.": math.log(0.3), "否": math.log(0.2), "**No": math.log(0.2)}
    assert judge.yes_probability(top) == pytest.approx(0.6)


def test_p_yes_is_none_when_neither_word_is_among_the_top_tokens():
    assert judge.yes_probability({"The": -0.1, "I": -2.0}) is None
    assert judge.yes_probability_of(None) is None
    assert judge.yes_probability_of(()) is None


def test_p_yes_uses_the_first_step_that_puts_yes_or_no_on_top():
    steps = (
        {"**": math.log(0.8), "Yes": math.log(0.15), "No": math.log(0.05)},  # opens with '**'
        {"No": math.log(0.9), "Yes": math.log(0.1)},
    )
    assert judge.yes_probability_of(steps) == pytest.approx(0.1)
    # no step has Yes/No on top: the first step where either appears at all
    assert judge.yes_probability_of(steps[:1]) == pytest.approx(0.75)


# ------------------------------------------------------------------ malformed judge answers


@pytest.mark.parametrize(("text", "letter"), [
    ("answer: B", "B"),
    ("Answer: (c)", "C"),
    ("answer\uff1aA", "A"),  # fullwidth colon
    ("A", "A"),
    ("(B) Incorrect", "B"),
    ("I think it is (A) Correct.", "A"),
    ("The proposed answer is incorrect.", "B"),
    ("I am not sure about this.", "C"),
    ("This is correct.", "A"),
    ("答案是错误的", "B"),
])
def test_reflection_choice_reads_lenient_answers(text, letter):
    assert judge.reflection_choice(text) == letter


@pytest.mark.parametrize("text", [
    "", "The capital of France is Paris.", "Either (A) or (B).", "42",
])
def test_reflection_choice_is_none_for_answers_without_a_choice(text):
    assert judge.reflection_choice(text) is None


def test_reflection_choice_falls_back_to_the_likeliest_letter_in_logprobs():
    steps = ({"The": math.log(0.5), " B": math.log(0.3), "A": math.log(0.2)},)
    assert judge.reflection_choice_from_logprobs(steps) == "B"
    assert judge.reflection_choice_from_logprobs(({"The": -0.1},)) is None


@pytest.mark.parametrize(("text", "expected"), [
    ('{"accuracy": 4, "helpfulness": 3, "detail": 5}', {"accuracy": 4, "helpfulness": 3,
                                                       "detail": 5}),
    ('Sure! ```json\n{"accuracy": 2, "helpfulness": 2.5, "detail": 9}\n```',
     {"accuracy": 2, "helpfulness": 2.5, "detail": 5}),  # clamped to 1..5
    ("accuracy: 3, helpfulness = 4, detail: 1", {"accuracy": 3, "helpfulness": 4, "detail": 1}),
])
def test_rubric_scores_parse_json_and_json_ish(text, expected):
    assert judge.rubric_scores(text) == expected


@pytest.mark.parametrize("text", [
    "", "The answer is good.", '{"accuracy": 4, "helpfulness": 3}', '{"accuracy": "high"}',
    '{"accuracy": true, "helpfulness": 3, "detail": 3}', "{not json",
])
def test_rubric_scores_refuse_incomplete_or_broken_answers(text):
    assert judge.rubric_scores(text) is None


# ------------------------------------------------------------------ similarity and combination


def test_final_number_prefers_the_gsm8k_marker_and_reads_commas():
    assert final_number("3 + 4 = 7 so\n#### 1,234") == 1234
    assert final_number("the answer is 12.5 dollars") == 12.5
    assert final_number("no digits") is None
    assert final_number("So 60-15") == 15  # subtraction, not -15
    assert final_number("pages 3,4") == 4  # two numbers, not 34
    assert final_number("a loss of -7") == -7


def test_answer_similarity_per_match_kind():
    assert answer_similarity("The  ANSWER", "the answer", "exact") == 1.0
    assert answer_similarity("#### 18", "so 9*2=18\n#### 18", "final_number") == 1.0
    assert answer_similarity("It is 17", "#### 18", "final_number") == 0.0
    assert answer_similarity("It is 17", "no number here", "final_number") is None
    assert answer_similarity("a b c", "a b d", "token_f1") == pytest.approx(2 / 3)
    # the folding of curate.text (NFKC too) and the words of curate.words (CJK characters)
    fullwidth = "\uff21\uff2e\uff33\uff37\uff25\uff32\u00a042"  # "ANSWER 42", NBSP
    assert answer_similarity(fullwidth, "answer 42", "exact") == 1.0
    assert answer_similarity("答案是七", "答案是八", "token_f1") == pytest.approx(3 / 4)


def test_combine_is_bsdetector_and_falls_back_to_the_side_present():
    assert combine(0.5, [1.0, 0.0], beta=0.7) == pytest.approx(0.7 * 0.5 + 0.3 * 0.5)
    assert combine(0.4, [], beta=0.7) == 0.4
    assert combine(None, [0.2, 0.6], beta=0.7) == pytest.approx(0.4)
    assert combine(None, [], beta=0.7) is None


def test_auroc_with_ties_and_degenerate_classes():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert auroc([0.3, 0.6, 0.6, 0.1], [True, True, False, False]) == pytest.approx(0.625)
    assert auroc([0.1, 0.2], [True, True]) is None


# ------------------------------------------------------------------ runners, scripted engine


class RuleEngine:
    """Answers each prompt with the first rule whose key is in the last user message."""

    model_name = "scripted"

    def __init__(self, rules: list[tuple[str, Completion | GenerationFailure]]) -> None:
        self.rules = rules
        self.prompts: list[str] = []

    def generate(self, prompts, sampling):
        answers = []
        for messages in prompts:
            text = messages[-1]["content"]
            self.prompts.append(text)
            answers.append(next(a for key, a in self.rules if key in text))
        return answers


def done(text: str, logprobs=None) -> Completion:
    return Completion(text, 20, 2, "stop", logprobs)


def rows_table(rows: list[dict]) -> pa.Table:
    n = len(rows)
    base = {"id": [f"r{i}" for i in range(n)], "input": pa.nulls(n, pa.string()),
            "source_id": [f"r{i}" for i in range(n)], "origin_step": ["input"] * n,
            "reject_step": pa.nulls(n, pa.string()), "reject_reason": pa.nulls(n, pa.string()),
            "reject_detail": pa.nulls(n, pa.string())}
    for key in rows[0]:
        base[key] = [row[key] for row in rows]
    return pa.table(base)


@pytest.fixture
def scripted(monkeypatch):
    """Runners get the given engine instead of loading a model; the rest of them is real."""

    def use(engine):
        monkeypatch.setattr(engine_pool, "build_engine", lambda spec: engine)
        return engine

    return use


def score_runner(**spec) -> ScoreRunner:
    return ScoreRunner(engine_spec=TransformersEngineSpec(), step="score",
                       spec=ScoreStepSpec(kind="score", engine="e", **spec),
                       sampling=SamplingParams(max_tokens=16))


def test_score_keeps_each_component_and_combines_them(scripted):
    engine = scripted(RuleEngine([
        ("Reply with Yes or No", done("Yes", (lp(Yes=0.6, No=0.2),))),
        ("really sure", done("answer: C")),
        ("Is the proposed answer", done("answer: A")),
        ("Reply with JSON", done('{"accuracy": 5, "helpfulness": 3, "detail": 1}')),
        ("Q1", done("so the result is 12\n#### 12")),  # a consistency sample
    ]))
    runner = score_runner(methods=["p_yes", "self_reflection", "consistency", "rubric"],
                          consistency_samples=2, consistency_match="final_number")
    out = runner(rows_table([{"instruction": "Q1", "output": "#### 12"}])).to_pylist()[0]
    assert out["score_p_yes"] == pytest.approx(0.75)
    assert out["score_self_reflection"] == pytest.approx(0.75)  # A=1 then C=0.5
    assert out["score_consistency"] == 1.0
    assert out["score_rubric"] == 3.0
    certainty = (0.75 + 0.75 + (3.0 - 1) / 4) / 3
    assert out["score_confidence"] == pytest.approx(0.7 * 1.0 + 0.3 * certainty)
    assert out["reject_reason"] is None
    assert out["score_prompt_tokens"] == 20 * 6  # p_yes, 2 reflections, rubric, 2 samples
    # the follow-up is asked in the same conversation as the first reflection answer
    assert any("really sure" in p for p in engine.prompts)


def test_score_rejects_rows_it_cannot_score_with_what_went_wrong_and_keeps_the_rest(scripted):
    scripted(RuleEngine([
        ("GOOD", done("Yes", (lp(Yes=0.9, No=0.1),))),
        ("BAD", done("The weather is nice", (lp(The=0.9, A=0.1),))),
        ("FAIL", GenerationFailure("prompt_too_long", "5000 > 2048")),
    ]))
    runner = score_runner(methods=["p_yes"])
    table = rows_table([
        {"instruction": "GOOD q", "output": "a"},
        {"instruction": "BAD q", "output": "a"},
        {"instruction": "FAIL q", "output": "a"},
        {"instruction": "GOOD but no response", "output": "  "},
    ])
    out = runner(table).to_pylist()
    assert out[0]["score_confidence"] == pytest.approx(0.9)
    assert out[0]["reject_reason"] is None
    assert out[1]["reject_reason"] == "unscorable"
    assert "no Yes/No among the top tokens" in out[1]["reject_detail"]
    assert out[2]["reject_reason"] == "unscorable"
    assert "prompt_too_long" in out[2]["reject_detail"]
    assert out[3]["reject_reason"] == "missing_response"
    assert len(out) == 4


def test_auto_correct_replacement_rule():
    assert replaces(0.8, 0.8) and replaces(0.95, 0.8)
    assert not replaces(0.79, 0.8) and not replaces(None, 0.8)
    # candidate second: P(Yes) is P(candidate better); candidate first: 1 - P(Yes)
    assert better_confidence(0.9, 0.3) == pytest.approx(0.8)
    assert better_confidence(0.9, None) == pytest.approx(0.9)
    assert better_confidence(None, None) is None


def correct_runner(threshold: float, **spec) -> CorrectRunner:
    return CorrectRunner(
        engine_spec=TransformersEngineSpec(), step="fix",
        spec=AutoCorrectStepSpec(kind="auto_correct", engine="e", **spec),
        threshold=Threshold(threshold, "absolute"), sampling=SamplingParams(max_tokens=16),
        phases=(CANDIDATE_PHASE, COMPARE_PHASE))


def test_auto_correct_replaces_only_confident_candidates_and_keeps_the_original(scripted):
    engine = scripted(RuleEngine([
        # comparison prompts (candidate as B, then as A): P(Yes) read from logprobs
        ("Response A:\nold-sure", done("Yes", (lp(Yes=0.95, No=0.05),))),
        ("Response A:\nnew-sure", done("No", (lp(Yes=0.05, No=0.95),))),
        ("Response A:\nold-unsure", done("Yes", (lp(Yes=0.6, No=0.4),))),
        ("Response A:\nnew-unsure", done("No", (lp(Yes=0.4, No=0.6),))),
        ("Response A:", done("hmm", (lp(Hmm=1.0),))),
        ("q-sure", done("new-sure")),  # candidate answers
        ("q-unsure", done("new-unsure")),
        ("garbled-q", done("new-garbled")),
        ("empty-q", done("   ")),
    ]))
    runner = correct_runner(threshold=0.5, eta=0.8)
    table = rows_table([
        {"instruction": "q-sure", "output": "old-sure", "score_confidence": 0.1},
        {"instruction": "q-unsure", "output": "old-unsure", "score_confidence": 0.2},
        {"instruction": "fine-q", "output": "old-fine", "score_confidence": 0.9},
        {"instruction": "garbled-q", "output": "old-garbled", "score_confidence": 0.3},
        {"instruction": "empty-q", "output": "old-empty", "score_confidence": 0.4},
        {"instruction": "unscored-q", "output": "old", "score_confidence": None},
    ])
    out = runner(table).to_pylist()
    sure, unsure, fine, garbled, empty, unscored = out
    assert sure["output"] == "new-sure"
    assert sure["fix_original_output"] == "old-sure"
    assert sure["fix_corrected"] is True
    assert sure["fix_better_confidence"] == pytest.approx(0.95)
    assert sure["reject_reason"] is None

    assert unsure["reject_reason"] == "not_corrected"
    assert unsure["output"] == "old-unsure"  # a rejected candidate never replaces the text
    assert unsure["fix_candidate"] == "new-unsure"
    assert "0.6000 < eta 0.8" in unsure["reject_detail"]

    assert fine["output"] == "old-fine" and fine["fix_corrected"] is False
    assert fine["fix_candidate"] is None and fine["reject_reason"] is None
    assert garbled["reject_reason"] == "judge_unreadable"
    assert empty["reject_reason"] == "candidate_failed"
    assert unscored["reject_reason"] == "missing_confidence"
    # only the rows below the threshold were answered by the writer
    assert not any("fine-q" in p for p in engine.prompts)


def test_judge_prompts_follow_the_question_language_and_keep_versions():
    english = judge.yes_no_prompt("What is 2 + 2?", "4")[0]["content"]
    chinese = judge.yes_no_prompt("二加二等于几\uff1f", "四")[0]["content"]
    assert english.startswith("Question:\nWhat is 2 + 2?") and "Yes or No" in english
    assert chinese.startswith("问题\uff1a\n二加二等于几\uff1f") and "候选回答\uff1a\n四" in chinese
    rubric = judge.rubric_prompt("What is 2 + 2?", "4")[0]["content"]
    assert '{"accuracy": 4, "helpfulness": 3, "detail": 5}' in rubric  # braces kept literal
    first = judge.reflection_prompt("二加二等于几\uff1f", "四")
    follow = judge.reflection_followup(first, "answer: A", "二加二等于几\uff1f")
    assert [m["role"] for m in follow] == ["user", "assistant", "user"]
    assert follow[1]["content"] == "answer: A" and "你真的确定" in follow[2]["content"]
    compare = judge.compare_prompt("q?", "old answer", "new answer")[0]["content"]
    assert compare.index("Response A:\nold answer") < compare.index("Response B:\nnew answer")
