"""The sentence_transformers engine kind: the real bundled all-MiniLM-L6-v2, and the job-load
checks that keep embedding and chat engines in their places."""

from __future__ import annotations

import numpy as np
import pytest

from augment_ray.config.job import parse_job
from augment_ray.engines.base import describe_engine
from augment_ray.engines.embedding_engine import EmbeddingEngineSpec, SentenceTransformersEngine
from augment_ray.errors import JobSpecError
from augment_ray.kinds import build_steps
from augment_ray.steps.engine_pool import prepare_engine
from augment_ray.steps.llm import LLMStep


def job(**refine) -> dict:
    return {
        "input": {"uri": "in/", "format": "parquet"},
        "output": {"uri": "out/"},
        "engines": {"small": {"kind": "transformers"},
                    "minilm": {"kind": "sentence_transformers", "threads": 2}},
        "steps": [{"kind": "refine", "engine": "small", **refine}],
    }


def test_the_bundled_model_embeds_offline_to_unit_vectors():
    engine = SentenceTransformersEngine(EmbeddingEngineSpec(threads=2))
    texts = ["Write a poem about the sea.", "Compose a poem about the ocean.",
             "List three prime numbers greater than 100.", ""]
    vectors = engine.embed(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.8 > 0.3 > unrelated
    assert engine.embed([]).shape == (0, 384)
    assert engine.model_name == "all-MiniLM-L6-v2"
    with pytest.raises(TypeError, match="embedding model"):
        engine.generate([], None)


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        prepare_engine(EmbeddingEngineSpec(model=str(tmp_path / "nope")))


def test_engine_roles_are_checked_when_the_job_loads():
    with pytest.raises(JobSpecError, match=r"steps\[0\]\.engine: engine 'minilm' is an embedding "
                       r"engine \(kind sentence_transformers\); this needs a chat engine"):
        parse_job({**job(), "steps": [{"kind": "refine", "engine": "minilm"}]}, source="j")
    with pytest.raises(JobSpecError, match=r"steps\[0\]\.embedder: engine 'small' is a chat "
                       r"engine.*needs an embedding engine \(minilm\)"):
        parse_job(job(embedder="small"), source="j")


def test_a_step_uses_the_named_embedder_or_the_bundled_one():
    named = build_steps(parse_job(job(embedder="minilm"), source="j"))[0]
    assert isinstance(named, LLMStep) and named.embedder_spec.threads == 2
    assert named.describe()["checks_embedder"] == "all-MiniLM-L6-v2"
    default = build_steps(parse_job(job(), source="j"))[0]
    assert default.embedder_spec == EmbeddingEngineSpec()
    # checks without cosines, or no checks at all: no embedder is loaded
    text_only = job(checks={"min_similarity": None})
    assert build_steps(parse_job(text_only, source="j"))[0].embedder_spec is None
    off = build_steps(parse_job(job(checks=False), source="j"))[0]
    assert off.embedder_spec is None and off.describe()["checks"] == {}
    assert describe_engine("minilm", EmbeddingEngineSpec())["engine_kind"] == \
        "sentence_transformers"
