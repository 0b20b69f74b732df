"""The embedder a generating step's checks use, loaded once per worker process."""

from __future__ import annotations

from augment_ray.engines.embedding_engine import EmbeddingEngineSpec, SentenceTransformersEngine
from augment_ray.validate.checks import Embed

_LOADED: dict[str, SentenceTransformersEngine] = {}


def process_embedder(spec: EmbeddingEngineSpec) -> Embed:
    """`spec`'s embed function. The model loads on first use in this process (an LLM step's
    actor, a ray.data.llm output task's worker) and stays for the process's later batches."""
    key = spec.model_dump_json()
    if key not in _LOADED:
        _LOADED[key] = SentenceTransformersEngine(spec)
    return _LOADED[key].embed
