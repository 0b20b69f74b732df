"""Semantic dedup (SemDeDup): rows whose embeddings are closer than a cosine threshold, joined
transitively, keep their lowest id. A barrier over the whole dataset.

  embed     steps/embedding_pool.py: a pool of the embedding engine adds a float16 unit vector
            per live row with text (journaled, so a rerun replays the vectors).
  train     rows picked by a seeded hash of their id (about 40 per cluster), sorted by id, train
            a seeded spherical k-means (Lloyd, numpy) in one task.
  assign    every vector goes to its nearest centroid, and also to the second nearest when that
            is almost as near (`second_cluster_margin`), so pairs across a border meet.
  pairs     hash shuffle by cluster; in each cluster, rows sorted by id, the pairs with cosine >=
            threshold are found tile by tile and joined into groups (each member -> the group's
            lowest id); one task joins the groups of all clusters (connected components) and
            keeps the lowest id of each.
  mark      every block: duplicates rejected (`semantic_duplicate`, with the cosine to the kept
            row, from the kept rows' vectors), the vector column dropped.
Every choice depends on ids and vectors only, so blocks, files and workers do not change the
result (up to the model's float noise, ~2e-7 per vector value between batch layouts). A pair
that shares no cluster is never compared: the price of not comparing every pair.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field

from augment_ray.config.steps import TextColumnsSpec
from augment_ray.curate import kmeans
from augment_ray.curate.components import KEEPER_SCHEMA, components
from augment_ray.curate.hashing import as_array, hash64
from augment_ray.curate.shuffle import hash_shuffle, parts_for
from augment_ray.engines.base import describe_engine
from augment_ray.engines.embedding_engine import EmbeddingEngineSpec
from augment_ray.kinds import step_kind
from augment_ray.progress import current_board
from augment_ray.rows import ID, live_mask, reject, set_column
from augment_ray.steps.dedup import DedupStep
from augment_ray.steps.embedding_pool import embed_rows, vector_matrix
from augment_ray.steps.engine_pool import pool_cpus, prepare_engine

log = logging.getLogger(__name__)

REASON = "semantic_duplicate"
ROWS_PER_ASSIGN_TASK = 50_000
ROWS_PER_PART = 50_000  # rows (whole clusters) one pair-search task gets, on average
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string())])


class DedupSemanticStepSpec(TextColumnsSpec):
    """Removes rows whose meaning repeats an earlier row's (SemDeDup): texts are embedded,
    clustered by k-means, and inside each cluster rows with cosine similarity at or above the
    threshold are joined transitively; the row with the lowest id of each group is kept. A
    barrier."""

    engine_fields: ClassVar[dict[str, str]] = {"engine": "embedding"}

    kind: Literal["dedup_semantic"]
    engine: str | None = Field(
        None, description="name of an embedding engine in `engines` (kind "
        "sentence_transformers); null: the bundled all-MiniLM-L6-v2 in one actor on 1 CPU")
    threshold: float = Field(
        0.9, gt=0.0, le=1.0,
        description="cosine similarity at or above which two rows are duplicates")
    clusters: int | None = Field(
        None, gt=0, description="k of k-means; default: rows with text / 1000 up to a million "
        "rows, their square root above (a pair that shares no cluster is never compared)")
    seed: int = Field(1, description="seed of the k-means start and of its training sample")
    second_cluster_margin: float = Field(
        0.01, ge=0.0, le=2.0,
        description="a row also joins its second-nearest cluster when its dot product with that "
        "centroid is within this of the nearest one's, so pairs across a cluster border are "
        "compared too (0: the nearest cluster only)")
    max_iterations: int = Field(
        20, gt=0, le=1000, description="most k-means (Lloyd) iterations; it stops earlier once "
        "fewer than 0.1% of the training rows change cluster")


# ---------------------------------------------------------------------------- barrier tasks


@ray.remote
def _count_vectors(block: pa.Table, column: str) -> int:
    if not block.num_rows or column not in block.column_names:
        return 0
    return block.num_rows - block[column].null_count


def _vectors(block: pa.Table, column: str) -> pa.Table:
    """(id, vector) of the block's rows with a vector."""
    if not block.num_rows or column not in block.column_names:
        return pa.table({ID: pa.array([], pa.string())})
    vectors = as_array(block[column])
    where = pc.indices_nonzero(vectors.is_valid())
    return pa.table({ID: as_array(block[ID]).take(where), "vector": vectors.take(where)})


@ray.remote
def _sample(block: pa.Table, column: str, fraction: float, seed: int) -> pa.Table:
    """The block's training rows: those whose seeded id hash falls below `fraction`."""
    table = _vectors(block, column)
    if fraction >= 1.0 or not table.num_rows:
        return table
    hashes = hash64([f"{seed}\x1f{i}" for i in table[ID].to_pylist()])
    return table.filter(pa.array(hashes < np.uint64(fraction * 2.0**64)))


@ray.remote(num_returns=2)
def _train(k: int, seed: int, max_iterations: int,
           *samples: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    table = pa.concat_tables([s for s in samples if s.num_rows]).sort_by(ID)
    _, x = vector_matrix(table["vector"])
    started = time.perf_counter()
    centroids, iterations = kmeans.spherical_kmeans(x, k, seed, max_iterations)
    log.info("k-means: %d centroids from %d rows, %d iterations (%.1fs)", len(centroids),
             len(x), iterations, time.perf_counter() - started)
    return centroids, {"kmeans_clusters": len(centroids), "kmeans_iterations": iterations,
                       "training_rows": len(x)}


@ray.remote
def _assign(centroids: np.ndarray, column: str, margin: float, *blocks: pa.Table) -> pa.Table:
    """(part: a cluster, second: whether it is the row's second cluster, id, vector) for every
    row with a vector in `blocks`: one row per cluster it joins."""
    tables = []
    for block in blocks:
        table = _vectors(block, column)
        if not table.num_rows:
            continue
        _, x = vector_matrix(table["vector"])
        first, second, gap = kmeans.nearest_two(kmeans.unit(x), centroids)
        tables.append(table.add_column(0, "part", pa.array(first.astype(np.uint64)))
                      .add_column(1, "second", pa.repeat(False, table.num_rows)))
        border = np.flatnonzero(gap <= margin)
        if len(border):
            extra = table.take(pa.array(border))
            tables.append(extra.add_column(0, "part", pa.array(second[border].astype(np.uint64)))
                          .add_column(1, "second", pa.repeat(True, len(border))))
    if not tables:
        return pa.table({"part": pa.array([], pa.uint64()), ID: pa.array([], pa.string())})
    return pa.concat_tables(tables)


def _cluster_duplicates(table: pa.Table | None, threshold: float
                        ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Reduce of the shuffle: whole clusters -> (edges (a, b): each duplicate to the lowest id
    of its group in the cluster; those lowest ids' vectors; counts)."""
    stats = {"pairs": 0, "largest_cluster": 0, "rows_in_two_clusters": 0}
    if table is None or table.num_rows == 0:
        return EDGE_SCHEMA.empty_table(), pa.table({ID: pa.array([], pa.string())}), stats
    table = table.sort_by([("part", "ascending"), (ID, "ascending")])
    parts = table["part"].to_numpy()
    _, x = vector_matrix(table["vector"])
    starts = np.flatnonzero(np.concatenate([[True], parts[1:] != parts[:-1]]))
    ends = np.append(starts[1:], len(parts))
    rows: list[np.ndarray] = []
    keepers: list[np.ndarray] = []
    for start, end in zip(starts, ends, strict=True):
        if end - start < 2:
            continue
        label, found = kmeans.similar_groups(kmeans.unit(x[start:end]), threshold)
        stats["pairs"] += found
        moved = np.flatnonzero(label != np.arange(end - start))
        if len(moved):
            rows.append(start + moved)
            keepers.append(start + label[moved])
    stats["largest_cluster"] = int((ends - starts).max())
    stats["rows_in_two_clusters"] = int(pc.sum(table["second"]).as_py() or 0)
    if not rows:
        return EDGE_SCHEMA.empty_table(), pa.table({ID: pa.array([], pa.string())}), stats
    ids = table[ID].combine_chunks()
    low = pa.array(np.unique(np.concatenate(keepers)))
    edges = pa.table({"a": ids.take(pa.array(np.concatenate(rows))),
                      "b": ids.take(pa.array(np.concatenate(keepers)))}, schema=EDGE_SCHEMA)
    return edges, pa.table({ID: ids.take(low), "vector": table["vector"].take(low)}), stats


@ray.remote(num_returns=3)
def _merge(rows: int, training: dict[str, int],
           *parts: tuple[pa.Table, pa.Table, dict[str, int]]
           ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Groups of every cluster joined (a row in two clusters links theirs) -> (id, keeper) of
    every duplicate, the keepers' vectors, the summary counts."""
    edges = pa.concat_tables([EDGE_SCHEMA.empty_table(), *(e for e, _, _ in parts)])
    keepers = components(edges["a"], edges["b"])
    kept = pc.unique(keepers["keeper"]) if keepers.num_rows else pa.array([], pa.string())
    vectors = [v for _, v, _ in parts if v.num_rows]
    if vectors:
        table = pa.concat_tables(vectors)
        first = pc.index_in(kept, value_set=as_array(table[ID]))  # a keeper's first copy
        vectors_table = table.take(first)
    else:
        vectors_table = pa.table({ID: pa.array([], pa.string())})
    counts = [c for _, _, c in parts]
    return keepers, vectors_table, {
        "rows_embedded": rows, **training,
        "rows_in_two_clusters": sum(c["rows_in_two_clusters"] for c in counts),
        "largest_cluster": max((c["largest_cluster"] for c in counts), default=0),
        "pairs": sum(c["pairs"] for c in counts),
        "duplicates": keepers.num_rows, "clusters": len(kept)}


def mark_semantic(block: pa.Table, keepers: pa.Table, keeper_vectors: pa.Table, step: str,
                  vector_column: str, threshold: float) -> pa.Table:
    """Reject live rows listed in `keepers` (id, keeper), naming the kept row and the cosine to
    it (`keeper_vectors`: id, vector); adds `<step>_duplicate_of` and drops the vector column."""
    column = f"{step}_duplicate_of"
    if keepers.num_rows == 0 or block.num_rows == 0 or vector_column not in block.column_names:
        if vector_column in block.column_names:
            block = block.drop_columns([vector_column])
        return set_column(block, column, pa.nulls(block.num_rows, pa.string()))
    where = as_array(pc.index_in(block[ID], value_set=as_array(keepers["id"])))
    dup = as_array(pc.and_(pc.is_valid(where), live_mask(block)))
    at = pc.fill_null(where, 0)
    kept = pc.if_else(dup, as_array(keepers["keeper"]).take(at), pa.scalar(None, pa.string()))
    flags = dup.to_pylist()
    positions = np.flatnonzero(flags)
    cosine: list[float] = []
    if len(positions):
        _, mine = vector_matrix(as_array(block[vector_column]).take(pa.array(positions)))
        theirs = pc.index_in(kept.take(pa.array(positions)), value_set=keeper_vectors[ID])
        _, other = vector_matrix(as_array(keeper_vectors["vector"]).take(theirs))
        cosine = np.einsum("ij,ij->i", kmeans.unit(mine), kmeans.unit(other)).tolist()
    block = set_column(block.drop_columns([vector_column]), column, kept)
    if not len(positions):
        return block
    values = iter(cosine)
    details = []
    for flag, keeper in zip(flags, kept.to_pylist(), strict=True):
        if not flag:
            details.append(None)
            continue
        value = next(values)
        if value >= threshold:
            details.append(f"duplicate of {keeper} (cosine {value:.3f})")
        else:  # in the group through other rows, each pair on the way >= threshold
            details.append(f"duplicate of {keeper} (cosine {value:.3f}, linked through rows "
                           f"with cosine >= {threshold:g})")
    return reject(block, dup, step, [REASON if f else None for f in flags], details)


_mark = ray.remote(mark_semantic)


def assign_groups(counts: list[int], most: int) -> list[list[int]]:
    """Consecutive block indices grouped so that a group holds at most `most` vectors (a
    bigger block is a group of its own)."""
    groups: list[list[int]] = [[]]
    held = 0
    for index, count in enumerate(counts):
        if groups[-1] and held + count > most:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += count
    return [g for g in groups if g]


# ---------------------------------------------------------------------------- the step


@step_kind(DedupSemanticStepSpec)
class DedupSemanticStep(DedupStep):
    reason = REASON

    @classmethod
    def from_spec(cls, spec: Any, job: Any) -> DedupSemanticStep:
        engine = job.engines[spec.engine] if spec.engine is not None else None
        return cls(spec, engine)

    def __init__(self, spec: DedupSemanticStepSpec,
                 engine_spec: EmbeddingEngineSpec | None = None) -> None:
        super().__init__(spec.step_name)
        self.spec = spec
        self.engine_spec = engine_spec or EmbeddingEngineSpec()
        self.vector_column = f"_{self.name}_vector"

    def prepare(self) -> None:
        prepare_engine(self.engine_spec)

    def cpu_request(self) -> float:
        return pool_cpus(self.engine_spec)

    def embed(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return embed_rows(ds, self.engine_spec, step=self.name, columns=self.spec.columns,
                          column=self.vector_column, vector_type="float16",
                          context=self.context, progress_board=current_board())

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return self.dedup_vectors(self.embed(ds))

    def dedup_vectors(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """The barrier, on rows that carry the vector column already."""
        ds = ds.materialize()  # upstream steps and the embedding finish here
        blocks = ds.to_arrow_refs()
        if not blocks:
            return ds
        started = time.perf_counter()
        keepers, vectors, stats = self.find_duplicates(blocks, ds.count())
        self.stats = ray.get(stats)
        log.info("%s: %s (%.1fs)", self.name, self.stats, time.perf_counter() - started)
        marked = [_mark.remote(block, keepers, vectors, self.name, self.vector_column,
                               self.spec.threshold) for block in blocks]
        return ray.data.from_arrow_refs(marked)

    def find_duplicates(self, blocks: list[ray.ObjectRef], rows: int
                        ) -> tuple[ray.ObjectRef, ray.ObjectRef, ray.ObjectRef]:
        """Blocks carrying the vector column -> refs of (id -> keeper, the keepers' vectors,
        stats)."""
        spec, column = self.spec, self.vector_column
        counts = ray.get([_count_vectors.remote(block, column) for block in blocks])
        n = sum(counts)
        if n < 2:
            return ray.put(KEEPER_SCHEMA.empty_table()), ray.put(pa.table({ID: []})), ray.put(
                {"rows_embedded": n, "pairs": 0, "duplicates": 0, "clusters": 0})
        k = min(spec.clusters or kmeans.default_clusters(n), max(n, 1))
        fraction = kmeans.training_rows(n, k) / n
        log.info("%s: clustering %d vectors into %d clusters", self.name, n, k)
        samples = [_sample.remote(block, column, fraction, spec.seed) for block in blocks]
        centroids, training = _train.remote(k, spec.seed, spec.max_iterations, *samples)
        assigned = [_assign.remote(centroids, column, spec.second_cluster_margin,
                                   *(blocks[i] for i in group))
                    for group in assign_groups(counts, ROWS_PER_ASSIGN_TASK)]
        parts = hash_shuffle([(assigned, "part")], parts_for(n, ROWS_PER_PART),
                             _cluster_duplicates, (spec.threshold,))
        return _merge.remote(n, training, *parts)

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        k = self.stats.get("kmeans_clusters")
        note = f"cosine >= {spec.threshold:g}" + (f", {k} k-means clusters" if k else "")
        return {**super().describe(), "columns": spec.columns, "threshold": spec.threshold,
                **describe_engine(spec.engine or "default", self.engine_spec),
                "second_cluster_margin": spec.second_cluster_margin, "vectors": "float16",
                "note": note}
