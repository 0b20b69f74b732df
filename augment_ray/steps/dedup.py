"""Global exact and near-duplicate removal. Both are barriers over the whole dataset.

Each row's fate depends only on the rows' ids and texts, never on blocks or workers:
  exact: key = blake2b-128 of the folded text; hash shuffle by key; in each key group the lowest
         id is kept.
  near:  MinHash signature -> LSH band keys; hash shuffle by band key; rows sharing a band are
         candidate pairs; (optionally) pairs are verified by the estimated Jaccard of their full
         signatures, which meet by two keyed shuffles; connected components over the remaining
         pairs; the lowest id of each component is kept.
The keeper table (id -> kept id) is built in a worker and reaches the mark tasks as one object
ref, so the driver holds refs and small counts only.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, model_validator

from augment_ray.config.base import NormalizeSpec
from augment_ray.config.steps import TextColumnsSpec
from augment_ray.curate import minhash
from augment_ray.curate.components import KEEPER_SCHEMA, components
from augment_ray.curate.hashing import as_array, hash64
from augment_ray.curate.shuffle import hash_shuffle, parts_for
from augment_ray.curate.text import joined_text
from augment_ray.errors import InputDataError
from augment_ray.kinds import step_kind
from augment_ray.rows import ID, live_mask, reject, set_column
from augment_ray.steps.base import Step

log = logging.getLogger(__name__)

# Bucket members compared pairwise when verifying; bigger buckets link every member to the
# bucket's smallest id only (a star), which keeps the pair count linear.
CLIQUE_LIMIT = 16


def _comparable(block: pa.Table, columns: list[str], normalize: NormalizeSpec,
                step: str) -> tuple[pa.Array, pa.Array]:
    """(ids, folded texts) of live rows with some text; other rows are never duplicates."""
    if not block.num_rows:  # Ray Data passes an empty input's blocks on without a schema
        return pa.array([], pa.string()), pa.array([], pa.string())
    text = joined_text(block, columns, normalize, step)
    keep = pc.and_(live_mask(block), pc.greater(pc.utf8_length(text), 0))
    ids = as_array(block[ID])
    return ids.filter(keep), text.filter(keep)


# ---------------------------------------------------------------------------- exact


@ray.remote
def _exact_keys(block: pa.Table, columns: list[str], normalize: NormalizeSpec,
                step: str) -> pa.Table:
    ids, text = _comparable(block, columns, normalize, step)
    keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()
            for t in text.to_pylist()]
    # the key is already a uniform hash: its first 8 bytes pick the shuffle part
    part = np.frombuffer(b"".join(keys), dtype=np.uint64).reshape(-1, 2)[:, 0] if keys \
        else np.zeros(0, np.uint64)
    return pa.table({
        "part": pa.array(part),
        "key": pa.array(keys, pa.binary(16)),
        ID: ids,
    })


def _duplicate_id_error(step: str, row_id: str) -> InputDataError:
    return InputDataError(
        f"Step {step!r}: id {row_id!r} is on more than one row with the same text; "
        "dedup keeps the row with the lowest id, so ids must be unique. Map a unique id "
        "column with input.columns.id, or leave it unset to get content ids."
    )


def _exact_groups(table: pa.Table | None, step: str) -> pa.Table:
    """Rows sorted by (key, id): the first of each key keeps, the rest point at it."""
    if table is None or table.num_rows == 0:
        return KEEPER_SCHEMA.empty_table()
    table = table.sort_by([("key", "ascending"), (ID, "ascending")])
    keys = table["key"].combine_chunks()
    ids = table[ID].combine_chunks()
    same_key = np.zeros(len(table), dtype=bool)
    if len(table) > 1:
        same_key[1:] = pc.equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
        same_id = pc.equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
        clash = np.flatnonzero(same_key[1:] & same_id)
        if len(clash):
            raise _duplicate_id_error(step, ids[int(clash[0])].as_py())
    starts = np.where(~same_key, np.arange(len(table)), 0)
    group_start = np.maximum.accumulate(starts)
    dup = np.flatnonzero(same_key)
    return pa.table({"id": ids.take(pa.array(dup)),
                     "keeper": ids.take(pa.array(group_start[dup]))}, schema=KEEPER_SCHEMA)


@ray.remote(num_returns=2)
def _merge_keepers(*tables: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    table = pa.concat_tables([KEEPER_SCHEMA.empty_table(), *tables])
    clusters = len(pc.unique(table["keeper"])) if table.num_rows else 0
    return table, {"duplicates": table.num_rows, "clusters": clusters}


# ---------------------------------------------------------------------------- near


@ray.remote(num_returns=2)
def _near_sign(block: pa.Table, spec: DedupNearStepSpec, bands: int,
               rows_per_band: int) -> tuple[pa.Table, pa.Table]:
    """-> (band table: one row per (row, band) with its band key; signature table)."""
    ids, text = _comparable(block, spec.columns, spec.normalize, spec.step_name)
    hashes, owner = minhash.shingle_hashes(text, spec.shingle, spec.shingle_size)
    perms = minhash.Permutations.make(spec.num_perm, spec.seed)
    sig = minhash.signatures(hashes, owner, len(ids), perms)
    keys = minhash.band_keys(sig, bands, rows_per_band)
    band_table = pa.table({
        "part": pa.array(keys.reshape(-1)),
        ID: ids.take(pa.array(np.repeat(np.arange(len(ids)), bands))),
    })
    if not spec.verify:
        return band_table, pa.table({})
    sig_table = pa.table({
        "node": pa.array(hash64(ids.to_pylist())),
        ID: ids,
        "sig": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4 * spec.num_perm), len(ids), [None, pa.py_buffer(sig.tobytes())]),
    })
    return band_table, sig_table


EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string())])


def _edges_table(a: list[str], b: list[str]) -> pa.Table:
    table = pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string())})
    table = table.group_by(["a", "b"]).aggregate([])  # the same pair from several bands
    return table.append_column("node_a", pa.array(hash64(table["a"].to_pylist())))


def _bucket_edges(table: pa.Table | None, cliques: bool) -> pa.Table:
    """Rows sharing a band key -> candidate pairs (a > b). Buckets up to CLIQUE_LIMIT rows give
    every pair when pairs will be verified; others link each member to the smallest id."""
    if table is None or table.num_rows == 0:
        return _edges_table([], [])
    table = table.sort_by([("part", "ascending"), (ID, "ascending")])
    keys = table["part"].to_numpy()
    ids = table[ID].to_pylist()
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    ends = np.append(starts[1:], len(keys))
    sizes = ends - starts
    a: list[str] = []
    b: list[str] = []
    for start, end in zip(starts[sizes > 1], ends[sizes > 1], strict=True):
        members = list(dict.fromkeys(ids[start:end]))  # a row repeats a band only if ids repeat
        if cliques and len(members) <= CLIQUE_LIMIT:
            for low, high in itertools.combinations(members, 2):
                a.append(high)
                b.append(low)
        else:
            a.extend(members[1:])
            b.extend([members[0]] * (len(members) - 1))
    return _edges_table(a, b)


def _attach_signature(edges: pa.Table | None, sigs: pa.Table | None, side: str) -> pa.Table:
    """Join the signature of edge end `side` (a or b) onto the edges."""
    if edges is None or edges.num_rows == 0 or sigs is None:
        return pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
    edges = edges.group_by(["a", "b"]).aggregate([]) if side == "a" else edges
    joined = edges.join(sigs.select([ID, "sig"]).rename_columns([side, f"sig_{side}"]),
                        keys=side, join_type="inner")
    if side == "a":
        joined = joined.append_column("node_b", pa.array(hash64(joined["b"].to_pylist())))
    return joined


def _verify_pairs(edges: pa.Table | None, sigs: pa.Table | None, threshold: float,
                  num_perm: int) -> pa.Table:
    joined = _attach_signature(edges, sigs, "b")
    if joined.num_rows == 0:
        return EDGE_SCHEMA.empty_table()
    sig_a = np.frombuffer(joined["sig_a"].combine_chunks().buffers()[1], dtype=np.uint32,
                          count=joined.num_rows * num_perm).reshape(-1, num_perm)
    sig_b = np.frombuffer(joined["sig_b"].combine_chunks().buffers()[1], dtype=np.uint32,
                          count=joined.num_rows * num_perm).reshape(-1, num_perm)
    similar = minhash.estimated_jaccard(sig_a, sig_b) >= threshold
    return joined.select(["a", "b"]).filter(pa.array(similar))


@ray.remote(num_returns=2)
def _cluster(candidates: int, *edge_tables: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    edges = pa.concat_tables([EDGE_SCHEMA.empty_table(),
                              *(t.select(["a", "b"]) for t in edge_tables)])
    keepers = components(edges["a"], edges["b"])
    clusters = len(pc.unique(keepers["keeper"])) if keepers.num_rows else 0
    return keepers, {"candidate_pairs": candidates, "pairs": edges.num_rows,
                     "duplicates": keepers.num_rows, "clusters": clusters}


@ray.remote
def _count_rows(table: pa.Table) -> int:
    return table.num_rows


# ---------------------------------------------------------------------------- marking


def mark_duplicates(block: pa.Table, keepers: pa.Table, step: str, reason: str) -> pa.Table:
    """Reject live rows listed in `keepers`, naming the kept row; adds `<step>_duplicate_of`."""
    column = f"{step}_duplicate_of"
    if keepers.num_rows == 0 or block.num_rows == 0:
        return set_column(block, column, pa.nulls(block.num_rows, pa.string()))
    where = as_array(pc.index_in(block[ID], value_set=as_array(keepers["id"])))
    dup = as_array(pc.and_(pc.is_valid(where), live_mask(block)))
    kept = pc.if_else(dup, as_array(keepers["keeper"]).take(pc.fill_null(where, 0)),
                      pa.scalar(None, pa.string()))
    block = set_column(block, column, kept)
    flags = dup.to_pylist()
    if any(flags):
        block = reject(block, dup, step, [reason if f else None for f in flags],
                       [f"duplicate of {k}" if f else None
                        for f, k in zip(flags, kept.to_pylist(), strict=True)])
    return block


_mark = ray.remote(mark_duplicates)


class DedupExactStepSpec(TextColumnsSpec):
    """Removes rows whose normalized text equals an earlier row's, across the whole dataset.
    The keeper of each group is the row with the lowest id. A barrier."""

    kind: Literal["dedup_exact"]
    normalize: NormalizeSpec = Field(
        default_factory=NormalizeSpec, description="how text is folded before it is compared")


class DedupNearStepSpec(TextColumnsSpec):
    """Removes near-duplicates with MinHash + LSH across the whole dataset: candidate pairs that
    share an LSH band, verified by estimated Jaccard, joined transitively into clusters; the row
    with the lowest id of each cluster is kept. A barrier."""

    kind: Literal["dedup_near"]
    normalize: NormalizeSpec = Field(
        default_factory=NormalizeSpec, description="how text is folded before it is compared")
    shingle: Literal["char", "word"] = Field(
        "char", description="shingles are n-grams of characters or of whitespace-split words"
    )
    shingle_size: int = Field(5, gt=0, le=64, description="n of the n-grams")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity at or above which rows are duplicates"
    )
    bands: int | None = Field(
        None, gt=0, description="LSH bands; with `rows` unset both are chosen from the threshold"
    )
    rows: int | None = Field(None, gt=0, description="MinHash values per band")
    verify: bool = Field(
        True,
        description="drop candidate pairs whose estimated Jaccard (from all num_perm values) is "
        "below the threshold before clustering",
    )
    seed: int = Field(1, description="seed of the MinHash permutations")

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupNearStepSpec:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither")
        if self.bands is not None and self.rows is not None and \
                self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands x rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}"
            )
        return self


class DedupStep(Step):
    """Shared barrier: materialize, find (id -> kept id), mark the rest as rejected."""

    reason: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats: dict[str, Any] = {}

    def output_columns(self) -> list[str]:
        return [f"{self.name}_duplicate_of"]

    def find_duplicates(self, blocks: list[ray.ObjectRef],
                        rows: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        raise NotImplementedError

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = ds.materialize()  # the barrier: upstream steps finish here
        blocks = ds.to_arrow_refs()
        rows = ds.count()
        if not blocks:
            return ds
        log.info("%s: looking for duplicates among %d rows in %d blocks", self.name, rows,
                 len(blocks))
        started = time.perf_counter()
        keepers, stats = self.find_duplicates(blocks, rows)
        self.stats = ray.get(stats)
        log.info("%s: %s (%.1fs)", self.name, self.stats, time.perf_counter() - started)
        marked = [_mark.remote(block, keepers, self.name, self.reason) for block in blocks]
        return ray.data.from_arrow_refs(marked)

    def describe(self) -> dict[str, Any]:
        # the report shows the duplicate clusters from this column
        return {**super().describe(), "duplicate_column": self.output_columns()[0],
                **self.stats}


@step_kind(DedupExactStepSpec)
class DedupExactStep(DedupStep):
    reason = "exact_duplicate"

    def __init__(self, spec: DedupExactStepSpec) -> None:
        super().__init__(spec.step_name)
        self.spec = spec

    def find_duplicates(self, blocks: list[ray.ObjectRef],
                        rows: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        keys = [_exact_keys.remote(block, self.spec.columns, self.spec.normalize, self.name)
                for block in blocks]
        groups = hash_shuffle([(keys, "part")], parts_for(rows), _exact_groups, (self.name,))
        return _merge_keepers.remote(*groups)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "columns": self.spec.columns,
                "normalize": self.spec.normalize.model_dump()}


@step_kind(DedupNearStepSpec)
class DedupNearStep(DedupStep):
    reason = "near_duplicate"

    def __init__(self, spec: DedupNearStepSpec) -> None:
        super().__init__(spec.step_name)
        self.spec = spec
        if spec.bands is not None and spec.rows is not None:
            self.bands, self.rows_per_band = spec.bands, spec.rows
        else:
            self.bands, self.rows_per_band = minhash.choose_bands(
                spec.threshold, spec.num_perm, spec.verify)

    def find_duplicates(self, blocks: list[ray.ObjectRef],
                        rows: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        spec = self.spec
        signed = [_near_sign.remote(block, spec, self.bands, self.rows_per_band)
                  for block in blocks]
        band_refs = [band for band, _ in signed]
        sig_refs = [sig for _, sig in signed]
        edges = hash_shuffle([(band_refs, "part")], parts_for(rows * self.bands, 500_000),
                             _bucket_edges, (spec.verify,))
        candidates = sum(ray.get([_count_rows.remote(e) for e in edges]))
        log.info("%s: %d candidate pairs from %d LSH bands x %d rows%s", self.name, candidates,
                 self.bands, self.rows_per_band, "; verifying them" if spec.verify else "")
        if spec.verify:
            parts = parts_for(rows, 100_000)
            with_a = hash_shuffle([(edges, "node_a"), (sig_refs, "node")], parts,
                                  _attach_signature, ("a",))
            edges = hash_shuffle([(with_a, "node_b"), (sig_refs, "node")], parts,
                                 _verify_pairs, (spec.threshold, spec.num_perm))
        return _cluster.remote(candidates, *edges)

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        curve = {f"{j:.2f}": round(minhash.candidate_probability(j, self.bands,
                                                                 self.rows_per_band), 4)
                 for j in (0.5, 0.6, 0.7, 0.8, 0.9)}
        return {**super().describe(), "columns": spec.columns,
                "shingle": f"{spec.shingle} {spec.shingle_size}-grams",
                "num_perm": spec.num_perm, "threshold": spec.threshold, "bands": self.bands,
                "rows_per_band": self.rows_per_band, "verify": spec.verify,
                "candidate_probability_by_jaccard": curve}
