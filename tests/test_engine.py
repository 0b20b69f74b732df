"""Transformers engine: how prompts are grouped into generation batches, and the slot refill
(continuous batching) that generates them by default."""

from __future__ import annotations

from collections import Counter

import pytest

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, GenerationFailure
from augment_ray.engines.transformers_engine import TransformersEngine, TransformersEngineSpec


def test_engine_batches_respect_size_and_token_budget():
    engine = object.__new__(TransformersEngine)  # batching needs only the spec
    engine.spec = TransformersEngineSpec(batch_size=3, max_batch_tokens=100)
    lengths = [10, 60, 10, 10, 10, 30, 20]
    batches = engine._batches(list(range(len(lengths))), lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
    assert [lengths[i] for i in batches[-1]] == [60]


# ---- slot refill (continuous batching) with the real bundled model ----------------------------

SHORT = "Is the sky blue? Answer yes or no."
LONG = "Write a long, detailed essay about the history of the printing press in Europe."
# mixed lengths and answers: some stop within MAX_TOKENS, some run to it
MIXED = [
    "What is the capital of France?", LONG, SHORT,
    "List twenty European capital cities, one per line, with a fact about each.",
    "What is 2 + 2? Answer with the number only.",
    "Explain, step by step and at length, how a bicycle's gears work.", "Say hi.",
    "Describe the water cycle.", "What is 3 times 3?",
]
MAX_TOKENS = 12


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine() -> TransformersEngine:
    # float32: bf16 on CPU makes a row's greedy answer depend on what it is batched with, so
    # only float32 can show the slot refill and the static batches answer token for token alike
    return TransformersEngine(TransformersEngineSpec(batch_size=3, threads=2, dtype="float32"))


def test_slot_refill_answers_greedy_as_the_static_batches(engine):
    prompts = [_user(text) for text in MIXED]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    slots = engine.generate(prompts, greedy)  # 9 prompts through 3 slots: refilled as they end
    static = engine.generate_static(prompts, greedy)
    assert slots == static
    reasons = Counter(c.finish_reason for c in slots)
    assert reasons["stop"] >= 2 and reasons["length"] >= 2, reasons  # the mix this test needs
    for completion in slots:
        assert completion.text
        if completion.finish_reason == "length":
            assert completion.completion_tokens == MAX_TOKENS
        else:  # the stop token is counted, not in the text
            assert completion.completion_tokens < MAX_TOKENS
            assert "<|im_end|>" not in completion.text


def test_slot_refill_reports_progress_as_answers_finish(engine):
    prompts = [_user(text) for text in MIXED]
    heard: list[tuple[int, int]] = []
    results = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS),
                              progress=lambda n, tokens: heard.append((n, tokens)))
    assert sum(n for n, _ in heard) == len(prompts)
    assert sum(tokens for _, tokens in heard) == sum(r.completion_tokens for r in results)
    assert len(heard) > 1  # as answers finish, not once at the end
    assert all(n > 0 for n, _ in heard)


def test_slot_refill_rejects_a_too_long_prompt_and_answers_the_rest(engine):
    too_long = _user("Summarize this: " + "lorem ipsum dolor sit amet " * 40)
    prompts = [_user(SHORT), too_long, _user(LONG)]
    lengths = [len(engine.tokenizer(engine.render(p), add_special_tokens=False)["input_ids"])
               for p in prompts]
    saved = engine.spec
    engine.spec = saved.model_copy(update={"max_prompt_tokens": max(lengths[0], lengths[2])})
    try:
        results = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    finally:
        engine.spec = saved
    assert isinstance(results[1], GenerationFailure)
    assert results[1].reason == "prompt_too_long"
    assert isinstance(results[0], Completion) and isinstance(results[2], Completion)
    alone = engine.generate_static([prompts[0], prompts[2]], SamplingParams(max_tokens=MAX_TOKENS))
    assert [results[0], results[2]] == alone


def test_slot_refill_sampling_is_reproducible_with_its_seed(engine):
    prompts = [_user(text) for text in MIXED[:5]]
    warm = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, seed=7)
    first = engine.generate(prompts, warm)
    assert engine.generate(prompts, warm) == first
    other = engine.generate(prompts, warm.model_copy(update={"seed": 8}))
    assert other != first
    greedy = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert first != greedy


def test_logprobs_still_come_from_the_static_batches(engine):
    result = engine.generate([_user(SHORT)], SamplingParams(max_tokens=4, logprobs=3))[0]
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
