"""The checks generating steps run on what their model wrote (validate/), one function at a time;
the real model and embedder run them in tests/test_augment_job.py and the example jobs."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from augment_ray.tasks.base import load_template
from augment_ray.validate.checks import (
    Candidate,
    NewInstructionChecks,
    PairChecks,
    ResponseChecks,
    RewriteChecks,
)
from augment_ray.validate.text import echo_share, not_a_request, refusal, template_echo

REFINE_TEMPLATE = load_template("refine", "v1", "en").text


@pytest.mark.parametrize("text", [
    "Write a haiku about autumn leaves, in English, with a 5-7-5 syllable count.",
    "What are three ways to cook eggs without oil? Answer in a numbered list.",
    "Given a list of integers, return the second largest one.",
    "When you pack for a week of hiking, list what to bring and why.",
    "To make the pairs share one analogy, write the fourth word.",
    "In this task, you are given a sentence. Classify its sentiment as positive or negative.",
    "Can you suggest five board games for a family of four?",
    "I need a 300-word cover letter for a junior data analyst job.",
    "请用三句话解释什么是机器学习。",
])
def test_requests_read_as_requests(text: str):
    assert not_a_request(text) is None


@pytest.mark.parametrize("text", [
    "The task is to create a haiku using the word summer.",
    "When answering this question in a job interview, I think about self-care.",
    "Sure! Here are some games: charades, Pictionary and Uno.",
    "Dear Sir, I am writing to decline your kind invitation.",
    "The idiom black sheep refers to a person who does not fit in.",
    "When rolling two dice, the probability of rolling a total of 3 is 1/18.",
    "In the field of quantum physics, superposition refers to a state of many states.",
])
def test_answers_and_statements_do_not(text: str):
    assert not_a_request(text) is not None


def test_template_echo_finds_scaffolding_and_the_prompts_own_words():
    assert template_echo("Instructions:\n\nBrainstorm resolutions.\n\nRewritten Instructions:")
    assert template_echo('Here is a rewritten version of the instruction: "List games."')
    # six words in a row from the prompt that asked for the rewrite
    assert template_echo("List games so that an AI assistant would answer it more helpfully",
                         REFINE_TEMPLATE)
    assert template_echo("List five games for a rainy afternoon indoors.", REFINE_TEMPLATE) is None


def test_refusals_and_echoes():
    assert refusal("I'm sorry, but I cannot help with that request.")
    assert refusal("As an AI language model, I do not have opinions.")
    assert refusal("The capital of France is Paris.") is None
    asked = "What is the capital of France?"
    assert echo_share(asked, "What is the capital of France? Think about it.") == 1.0
    assert echo_share(asked, "The capital of France is Paris.") == 0.5  # reuses, answers
    assert echo_share(asked, "Paris.") == 0.0


def unit(*vectors: list[float]) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def table_embed(table: dict[str, list[float]]):
    """A stand-in embedder with chosen vectors (the real one runs in the integration tests)."""
    def embed(texts: list[str]) -> np.ndarray:
        return unit(*(table[t] for t in texts))
    return embed


def test_rewrite_checks_measure_and_report():
    original = "Make a grocery list."
    faithful = "Make a grocery list for a healthy vegetarian dinner for four people."
    drifted = "Write a poem about the sea at night, in four rhyming stanzas."
    embed = table_embed({original: [1, 0], faithful: [0.9, 0.1], drifted: [0.1, 0.9]})
    verdicts = RewriteChecks().check([Candidate(original, faithful), Candidate(original, drifted),
                                      Candidate(original, "Make a list.")], embed)
    assert verdicts[0] is None
    assert verdicts[1][0] == "unfaithful" and "cosine 0.110 < min_similarity 0.5" in verdicts[1][1]
    assert verdicts[2][0] == "not_longer" and "length ratio 0.60" in verdicts[2][1]
    [same] = RewriteChecks().check([Candidate(original, "make a grocery list. ")], embed)
    assert same[0] == "not_longer" and same[1].startswith("unchanged")
    # each check can be turned off, and all at once with `checks: false`
    off = RewriteChecks(min_similarity=None, min_length_ratio=None)
    assert off.check([Candidate(original, drifted)], None) == [None]
    assert not off.needs_embeddings
    disabled = RewriteChecks.model_validate(False)
    assert not disabled.enabled and disabled.describe() == {}
    assert disabled.check([Candidate(original, "Sure! Here it is.")], None) == [None]
    assert RewriteChecks().describe() == {"template_echo": True, "not_a_request": True,
                                          "unfaithful": 0.5, "not_longer": 1.0}
    with pytest.raises(ValidationError):
        RewriteChecks(min_similarity=2)


def test_new_instruction_checks_on_task_new_and_unlike_siblings():
    seed = "Write a haiku about autumn."
    fresh, copy, sibling, other = ("Write a limerick about a cat.",
                                   "Write a haiku about the autumn season.",
                                   "Write a limerick about a kitten.",
                                   "What is the boiling point of water?")
    embed = table_embed({seed: [1, 0, 0], fresh: [0.6, 0.8, 0], copy: [0.99, 0.01, 0],
                         sibling: [0.6, 0.79, 0.01], other: [0, 0, 1]})
    verdicts = NewInstructionChecks().check([
        Candidate(seed, fresh, group="s1"), Candidate(seed, copy, group="s1"),
        Candidate(seed, sibling, group="s1"), Candidate(seed, other, group="s1"),
        Candidate(seed, sibling, group="s2")], embed)
    assert verdicts[0] is None
    assert [v[0] for v in verdicts[1:4]] == ["not_new", "near_sibling", "off_task"]
    assert verdicts[4] is None  # a sibling only within its own seed
    # an answer kept earlier in the batch is compared against, not judged again
    kept = NewInstructionChecks().check([Candidate(seed, fresh, "s1", kept=True),
                                         Candidate(seed, sibling, "s1")], embed)
    assert kept[0] is None and kept[1][0] == "near_sibling"


def test_response_checks():
    instruction = "What is the capital of France?"
    answer, drift = "The capital of France is Paris.", "Bananas are rich in potassium."
    embed = table_embed({instruction: [1, 0], answer: [0.8, 0.6], drift: [0.05, 1]})
    verdicts = ResponseChecks().check([
        Candidate(instruction, answer), Candidate(instruction, "I'm sorry, I can't answer."),
        Candidate(instruction, "What is the capital of France?"),
        Candidate(instruction, drift)], embed)
    assert verdicts[0] is None
    assert [v[0] for v in verdicts[1:]] == ["refusal", "echoes_instruction", "off_topic"]
    pair = PairChecks()
    assert set(pair.describe()) == {"template_echo", "not_a_request", "off_task", "not_new",
                                    "near_sibling", "refusal", "echoes_instruction", "off_topic"}
    assert pair.needs_embeddings and not PairChecks.model_validate(False).needs_embeddings
