"""How varied a generating step's texts are, before and after: mean pairwise cosine distance and
the Vendi score of embeddings, plus the share of its outputs that passed each of its checks.

The run's driver calls `add_diversity` once the rows are written (before the summary is): it
reads a seeded sample of each generating step's input and output texts from the written shards
(only the columns it needs, shards in a seeded order, stopping once every sample has enough
candidates from at least MIN_SHARDS shards), embeds them with the embedding engine
(all-MiniLM-L6-v2 by default, on the driver's CPU) and puts the figures into the step's summary
entry. It never fails the run: any error is a warning and the figures are left out.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from augment_ray.rows import INPUT_STEP, ORIGIN_STEP, REJECT_STEP
from augment_ray.storage import Location

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 256  # texts per side (inputs, outputs) of each step
SEED = 0
# stop reading shards once every sample has seen this many times its size in candidates and
# at least MIN_SHARDS shards are read (shards follow input files, which may differ in kind)
OVERSAMPLE = 8
MIN_SHARDS = 8
MAX_TEXT_TOKENS = 128  # texts are embedded up to this many tokens

Embed = Callable[[list[str]], np.ndarray]


# ---------------------------------------------------------------------------- the metrics


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float64 copies of the rows scaled to length 1 (a zero row stays zero)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an n x d matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def mean_cosine_distance(vectors: np.ndarray) -> float | None:
    """Mean of 1 - cos(a, b) over all pairs of distinct rows; None below two rows. O(n d):
    the sum of all pairwise similarities is |sum of the unit vectors|^2 minus the diagonal."""
    x = unit_rows(vectors)
    n = len(x)
    if n < 2:
        return None
    total = x.sum(axis=0)
    diagonal = float(np.einsum("ij,ij->", x, x))  # n, unless some rows are zero
    return 1.0 - (float(total @ total) - diagonal) / (n * (n - 1))


def vendi_score(vectors: np.ndarray) -> float | None:
    """Vendi score (Friedman & Dieng 2023) with the cosine kernel: exp of the Shannon entropy of
    the eigenvalues of K/n, K[i, j] = cos(x_i, x_j). 1 when every row is the same, n when all are
    orthogonal: the effective number of distinct items. K = X X^T shares its non-zero
    eigenvalues with X^T X, the squares of X's singular values, so this is an SVD of the
    n x d matrix (O(n d^2) for n > d), never an n x n eigenproblem. None for no rows."""
    x = unit_rows(vectors)
    if len(x) == 0:
        return None
    singular = np.linalg.svd(x, compute_uv=False)
    weights = singular**2
    weights = weights[weights > 1e-12 * max(float(weights.max(initial=0.0)), 1e-300)]
    if weights.size == 0:
        return None  # every row was zero
    weights = weights / weights.sum()  # = eigenvalues of K/n (trace n for unit rows)
    return float(np.exp(-np.sum(weights * np.log(weights))))


def diversity_of(vectors: np.ndarray) -> dict[str, Any]:
    """{n, mean_cosine_distance, vendi} of one set of embeddings (rounded for the summary)."""
    distance, vendi = mean_cosine_distance(vectors), vendi_score(vectors)
    return {"n": len(vectors),
            "mean_cosine_distance": None if distance is None else round(distance, 4),
            "vendi": None if vendi is None else round(vendi, 2)}


def checks_passed(entry: dict[str, Any]) -> dict[str, float] | None:
    """Share of the rows a step checked that no check rejected for each reason its summary entry
    lists under `checks` ({reason: threshold or true}): 1 - rejected[reason] / rows checked, the
    rows checked being the rows it created (a generating step) or got (an annotating one), as
    the summary counts them (so including rows rejected before a check ran: an unparsable
    answer). A row is rejected for its first failed check only. None without a `checks` key
    (a summary of before them), with every check off, or without rows."""
    checks = entry.get("checks")
    new_rows = bool((entry.get("diversity") or {}).get("new_rows"))
    checked = entry.get("rows_created", 0) if new_rows else entry.get("rows_in", 0)
    if not isinstance(checks, dict) or not checks or not checked:
        return None
    rejected = entry.get("rejected") or {}
    return {reason: round(1.0 - rejected.get(reason, 0) / checked, 4) for reason in checks}


# ---------------------------------------------------------------------------- sampling texts


class TextSample:
    """A seeded uniform sample of at most `limit` non-blank texts of everything offered."""

    def __init__(self, limit: int, rng: np.random.Generator) -> None:
        self.limit = limit
        self.rng = rng
        self.keys = np.zeros(0)
        self.texts: list[str] = []
        self.seen = 0

    def offer(self, values: pa.ChunkedArray | pa.Array) -> None:
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            return  # an all-null column (or not text): nothing to measure
        present = values.filter(pc.not_equal(pc.utf8_trim_whitespace(values), ""))  # nulls out
        if not len(present):
            return
        self.seen += len(present)
        keys = self.rng.random(len(present))
        # only the lowest keys can make the sample: Python strings for at most `limit` rows
        best = np.argsort(keys, kind="stable")[:self.limit]
        texts = present.take(pa.array(best)).to_pylist()
        merged = np.concatenate([self.keys, keys[best]])
        pool = self.texts + texts
        keep = np.argsort(merged, kind="stable")[:self.limit]
        self.keys, self.texts = merged[keep], [pool[i] for i in keep]

    def first(self, k: int) -> list[str]:
        # kept in key order, so any prefix is itself a uniform sample
        return self.texts[:k]


@dataclass
class StepSides:
    """Which rows and columns are one generating step's inputs and outputs."""

    name: str
    input_column: str
    output_column: str
    new_rows: bool
    before: list[str]  # steps (and "input") whose rows reach this one
    after: list[str]  # this step and the later ones: a row they rejected reached this step
    inputs: TextSample = field(init=False)
    outputs: TextSample = field(init=False)

    def reached(self, table: pa.Table) -> pa.ChunkedArray:
        """The rows this step got: made before it and not rejected before it."""
        made = pc.is_in(table[ORIGIN_STEP], value_set=pa.array(self.before, pa.string()))
        live = pc.or_kleene(pc.is_null(table[REJECT_STEP]),
                            pc.is_in(table[REJECT_STEP], value_set=pa.array(self.after,
                                                                          pa.string())))
        return pc.and_kleene(made, live)

    def offer(self, table: pa.Table, kept: bool) -> None:
        self.inputs.offer(table.filter(self.reached(table))[self.input_column])
        if not kept:
            return  # outputs are kept rows only
        mine = (pc.equal(table[ORIGIN_STEP], self.name) if self.new_rows
                else self.reached(table))
        self.outputs.offer(table.filter(mine)[self.output_column])

    def enough(self, factor: int) -> bool:
        return all(s.seen >= factor * s.limit for s in (self.inputs, self.outputs))


def generating_sides(steps: Sequence[dict[str, Any]], limit: int, seed: int = SEED
                     ) -> list[StepSides]:
    """A StepSides for every summary entry with a `diversity` key (Step.describe())."""
    names = [str(entry.get("name")) for entry in steps]
    sides = []
    for index, entry in enumerate(steps):
        columns = entry.get("diversity")
        if not isinstance(columns, dict) or not columns.get("input") or not columns.get("output"):
            continue
        side = StepSides(entry["name"], columns["input"], columns["output"],
                         bool(columns.get("new_rows")), names[:index] or [INPUT_STEP],
                         names[index:])
        side.inputs = TextSample(limit, np.random.default_rng([seed, index, 0]))
        side.outputs = TextSample(limit, np.random.default_rng([seed, index, 1]))
        sides.append(side)
    return sides


def _read(shard: Location, columns: list[str]) -> pa.Table:
    """The named columns of one shard; absent ones come back as string nulls."""
    with shard.fs.open_input_file(shard.path) as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        table = parquet.read(columns=[c for c in columns if c in names])
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        elif pa.types.is_null(table.schema.field(name).type):  # a column no row filled
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, pa.nulls(table.num_rows, pa.string()))
    return table


def sample_texts(root: Location, data: Sequence[str], rejects: Sequence[str],
                 sides: list[StepSides], seed: int = SEED) -> int:
    """Fill every step's samples from the shards `data` (kept rows) and `rejects`, paths under
    `root`, read in a seeded order until each sample has enough candidates (from at least
    MIN_SHARDS shards). Returns the number of shards read."""
    columns = list(dict.fromkeys([ORIGIN_STEP, REJECT_STEP, *(
        c for s in sides for c in (s.input_column, s.output_column))]))
    shards = [(name, True) for name in data] + [(name, False) for name in rejects]
    order = np.random.default_rng(seed).permutation(len(shards))
    read = 0
    for position in order:
        if read >= MIN_SHARDS and all(side.enough(OVERSAMPLE) for side in sides):
            break
        name, kept = shards[position]
        table = _read(root.join(name), columns)
        read += 1
        for side in sides:
            side.offer(table, kept)
    return read


# ---------------------------------------------------------------------------- the pass


@functools.cache
def default_embedder() -> tuple[Embed, str]:
    """The embedding engine's default model (bundled all-MiniLM-L6-v2) in this process, loaded
    once per process (a driver that runs several jobs loads it once). Texts are cut to
    MAX_TEXT_TOKENS: the cost is per token, and a response's first 128 tokens say what it is
    about (all-MiniLM-L6-v2 was trained on 128-token texts)."""
    from augment_ray.engines.embedding_engine import EmbeddingEngineSpec, SentenceTransformersEngine

    engine = SentenceTransformersEngine(EmbeddingEngineSpec(max_text_tokens=MAX_TEXT_TOKENS))
    return engine.embed, engine.model_name


def step_diversity(root: Location, data: Sequence[str], rejects: Sequence[str],
                   steps: Sequence[dict[str, Any]], sample: int = DEFAULT_SAMPLE,
                   embedder: tuple[Embed, str] | None = None, seed: int = SEED
                   ) -> dict[str, dict[str, Any]]:
    """{step: {inputs: {n, mean_cosine_distance, vendi}, outputs: {...}, embedder}} for every
    generating step of `steps` (summary entries; those with a `diversity` key), from seeded
    samples of at most `sample` texts per side. Both sides of a step are cut to the same size
    (the Vendi score grows with it), unless one is empty."""
    sides = generating_sides(steps, sample, seed)
    if not sides or sample <= 0:
        return {}
    sample_texts(root, data, rejects, sides, seed)
    picked: dict[str, tuple[list[str], list[str]]] = {}
    for side in sides:
        k = min(len(side.inputs.texts), len(side.outputs.texts)) or sample
        picked[side.name] = (side.inputs.first(k), side.outputs.first(k))
    distinct = sorted({t for pair in picked.values() for texts in pair for t in texts})
    embed, model = embedder or default_embedder()
    vectors = embed(distinct) if distinct else np.zeros((0, 1), np.float32)
    row = {text: i for i, text in enumerate(distinct)}
    result = {}
    for name, (inputs, outputs) in picked.items():
        result[name] = {
            "inputs": diversity_of(vectors[[row[t] for t in inputs]]),
            "outputs": diversity_of(vectors[[row[t] for t in outputs]]),
            "embedder": model,
        }
    return result


def add_diversity(steps: list[dict[str, Any]], root: Location, manifest: dict[str, Any],
                  sample: int = DEFAULT_SAMPLE) -> None:
    """Put `checks_passed` and the diversity figures into the generating steps' summary entries,
    reading the shards the manifest lists (`files`, `reject_files`) under `root` (the output,
    or its staging folder before the commit). Never raises: a failure is a warning."""
    for entry in steps:
        shares = checks_passed(entry)
        if shares is not None:
            entry["checks_passed"] = shares
    if sample <= 0 or not any(isinstance(e.get("diversity"), dict) for e in steps):
        return
    started = time.perf_counter()
    try:
        figures = step_diversity(root, manifest.get("files", []),
                                 manifest.get("reject_files", []), steps, sample)
    except Exception as error:  # diversity is a report figure: never the run's failure
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        log.warning("Diversity figures left out of the summary: %s: %s",
                    type(error).__name__, first)
        return
    for entry in steps:
        if entry.get("name") in figures:
            entry["diversity"] = {**entry["diversity"], **figures[entry["name"]]}
    log.info("Diversity of %d generating steps in %.1fs", len(figures),
             time.perf_counter() - started)


def format_diversity(entry: dict[str, Any]) -> str:
    """`diversity vendi 41.2 -> 37.5` for a step's summary line ('' when not computed, or when a
    side has fewer than two texts: one text is one distinct text, which says nothing)."""
    figures = entry.get("diversity") or {}
    sides = [figures.get("inputs") or {}, figures.get("outputs") or {}]
    before, after = (side.get("vendi") for side in sides)
    if (before is None or after is None or not all(map(math.isfinite, (before, after)))
            or min(side.get("n", 0) for side in sides) < 2):
        return ""
    return f"diversity vendi {before:.1f} -> {after:.1f}"
