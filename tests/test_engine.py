"""Transformers engine: how prompts are grouped into generation batches."""

from __future__ import annotations

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
