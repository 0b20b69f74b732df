"""An actor-pool stage that adds a vector column: the text of some row columns, embedded by an
embedding engine (kind sentence_transformers), one model copy per actor.

The text of a row is its `columns` joined by a newline (nulls as empty), as the model should
see it (no folding: the tokenizer has its own). Rows an earlier step rejected, and rows with
no text, get a null vector and are otherwise passed through unchanged. The column is a
fixed-size list of `dim` float32 (or float16, half the memory) values, unit length.

With a journal (`EmbeddingJournal`, under <output>/_work/<pool>/) every vector is journaled as
the model gave it (float32), keyed by (model, text), and a rerun after a crash replays them
instead of embedding again, so what is computed from them repeats exactly. An engine call that
raises rejects its rows (`engine_error`), as GuardedEngine does for chat engines.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from augment_ray.curate.text import COLUMN_SEPARATOR, text_columns
from augment_ray.engines.embedding_engine import EmbeddingEngineSpec
from augment_ray.io.journal import EmbeddingJournal
from augment_ray.progress import CallProgress, input_rows
from augment_ray.rows import live_mask, reject_rows, set_column
from augment_ray.steps.base import RunContext
from augment_ray.steps.engine_pool import EngineActor, map_with_engine_pool

log = logging.getLogger(__name__)

VectorType = Literal["float32", "float16"]
VALUE_TYPES: dict[str, pa.DataType] = {"float32": pa.float32(), "float16": pa.float16()}


def model_key(spec: EmbeddingEngineSpec) -> str:
    """What the journal keys vectors by besides the text: the model and its token cut."""
    return f"{spec.model}\x1f{spec.max_text_tokens}"


def row_texts(table: pa.Table, columns: list[str], step: str) -> list[str | None]:
    """Per row the text to embed, or None: rejected rows and rows with only whitespace."""
    if not table.num_rows:
        return []
    arrays = [pc.fill_null(a, "") for a in text_columns(table, columns, step)]
    joined = arrays[0] if len(arrays) == 1 else pc.binary_join_element_wise(
        *arrays, COLUMN_SEPARATOR)
    wanted = pc.and_(live_mask(table), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(
        joined)), 0))
    return [text if keep else None
            for text, keep in zip(joined.to_pylist(), wanted.to_pylist(), strict=True)]


def vector_array(rows: int, where: list[int], vectors: np.ndarray, dim: int,
                 vector_type: VectorType) -> pa.FixedSizeListArray:
    """A fixed-size list column: vectors[i] at row where[i], null elsewhere."""
    dtype = np.float16 if vector_type == "float16" else np.float32
    values = np.zeros((rows, dim), dtype=dtype)
    if len(where):
        values[where] = vectors
    missing = np.ones(rows, dtype=bool)
    missing[where] = False
    return pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1), VALUE_TYPES[vector_type]), dim, mask=pa.array(missing))


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(row positions with a vector, their vectors as a (rows x dim) array of the stored type)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array(
            [], column.type)
    where = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    dim = column.type.list_size
    kept = column if len(where) == len(column) else column.take(pa.array(where))
    values = kept.values.slice(kept.offset * dim, len(kept) * dim)
    matrix = values.to_numpy(zero_copy_only=False).reshape(len(kept), dim)
    return where, matrix


class EmbeddingRunner(EngineActor):
    """Ray Data actor UDF: loads the embedding model once, then embeds one batch per call."""

    def __init__(self, engine_spec: EmbeddingEngineSpec, step: str, columns: list[str],
                 column: str, vector_type: VectorType,
                 journal: EmbeddingJournal | None = None, progress_board: Any = None,
                 engine_name: str = "") -> None:
        # no generation journal: vectors have their own
        super().__init__(engine_spec, step=step, progress_board=progress_board,
                         engine_name=engine_name)
        self.journal = journal.for_this_actor() if journal else None
        self.columns = columns
        self.column = column
        self.vector_type = vector_type
        self.model_key = model_key(engine_spec)

    def _embed(self, texts: list[str]) -> np.ndarray:
        embed = self.engine.embed
        if self.journal is None:
            return embed(texts)
        return self.journal.embed(embed, self.model_key, texts)

    def __call__(self, table: pa.Table) -> pa.Table:
        texts = row_texts(table, self.columns, self.step)
        where = [i for i, text in enumerate(texts) if text is not None]
        progress = None if self.progress_board is None else CallProgress(
            self.progress_board, self.step, input_rows(table), len(where))
        started = time.perf_counter()
        dim = self.engine.dimension
        vectors = np.zeros((0, dim), np.float32)
        try:
            if where:
                vectors = self._embed([texts[i] for i in where])
        except Exception as error:  # any engine bug becomes rejected rows
            log.exception("%s: embedding %d texts failed", self.step, len(where))
            detail = f"{type(error).__name__}: {error}"[:500]
            if progress:
                progress.finished(0)
            table = reject_rows(table, self.step, {i: ("engine_error", detail) for i in where})
            return set_column(table, self.column,
                              vector_array(len(table), [], vectors, dim, self.vector_type))
        seconds = time.perf_counter() - started
        if where:
            log.info("%s: embedded %d texts in %.1fs (%.0f/s)", self.step, len(where), seconds,
                     len(where) / seconds if seconds else 0)
        if progress:
            progress(len(where), 0)
            progress.finished(0)
        return set_column(table, self.column,
                          vector_array(len(table), where, vectors, dim, self.vector_type))


def embedding_journal(context: RunContext | None, pool: str) -> EmbeddingJournal | None:
    """The pool's vector journal for this run (None when the run keeps none)."""
    if context is None or context.work is None:
        return None
    return EmbeddingJournal.open(context.work, pool, context.run_id)


def embed_rows(ds: ray.data.Dataset, engine_spec: EmbeddingEngineSpec, *, step: str,
               columns: list[str], column: str, vector_type: VectorType = "float32",
               context: RunContext | None = None, progress_board: Any = None
               ) -> ray.data.Dataset:
    """ds with `column` added: the vector of each live row's text (see the module docstring), on
    a pool of `engine_spec.replicas` actors with its num_cpus / num_gpus."""
    return map_with_engine_pool(ds, EmbeddingRunner, engine_spec, {
        "step": step, "columns": columns, "column": column, "vector_type": vector_type,
        "progress_board": progress_board,
    }, journal=embedding_journal(context, step),
        max_restarts=context.max_actor_restarts if context else 3)
