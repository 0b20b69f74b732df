"""A finished run's output -> the views the report draws from.

Only committed outputs are read (`_SUCCESS`), only the shards `_manifest.json` lists, and only the
columns a view needs. Exact counts (labels, duplicate clusters, reject reasons) come from small
columns of every shard; text (lengths, samples) comes from a uniform random sample of at most
SAMPLE_LIMIT rows per side, kept with a reservoir so memory stays flat whatever the run's size.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from augment_ray.io.committed import (
    MANIFEST,
    SUMMARY,
    committed_files,
    read_json,
    require_committed,
)
from augment_ray.rows import ID, INPUT_STEP, ORIGIN_STEP, REJECT_DETAIL, REJECT_REASON, REJECT_STEP
from augment_ray.storage import Location, describe_os_error, redact_uri

# the commit layout written by augment_ray/io/write.py (not imported: that module imports Ray)

SAMPLE_LIMIT = 20_000
SEED = 0
INSTRUCTION = "instruction"
OUTPUT = "output"
_KEY = "__sample_key"
_DUPLICATE_OF = re.compile(r"^duplicate of (\S+)$")


@dataclass
class Columns:
    """Which columns of this output the report uses."""

    instruction_after: str  # the kept rows' final instruction (a refine step's output, if any)
    refine_column: str | None
    refine_step: str | None
    scores: list[str]
    labels: list[str]
    generating: list[str]  # steps whose created rows carry <step>_parent_id
    dedup: list[str]


@dataclass
class RunView:
    uri: str
    summary: dict[str, Any]
    manifest: dict[str, Any]
    columns: Columns
    before: pa.Table  # sample of input-origin rows (data/ + _rejects/): instruction, output
    before_total: int
    after: pa.Table  # sample of kept rows (data/)
    after_total: int
    rejected: pa.Table  # sample of rejected rows' score columns
    rejected_total: int
    labels_before: dict[str, Counter[str]] = field(default_factory=dict)
    labels_after: dict[str, Counter[str]] = field(default_factory=dict)
    clusters: dict[str, Counter[str]] = field(default_factory=dict)  # step -> kept id -> size
    reject_examples: dict[tuple[str, str], str] = field(default_factory=dict)
    parents: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> parent row


class Reservoir:
    """A uniform random sample of at most `limit` rows of everything added (seeded)."""

    def __init__(self, limit: int, seed: int = SEED) -> None:
        self.limit = limit
        self.rng = np.random.default_rng(seed)
        self.table: pa.Table | None = None
        self.seen = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.seen += table.num_rows
        keyed = table.append_column(_KEY, pa.array(self.rng.random(table.num_rows)))
        merged = keyed if self.table is None else pa.concat_tables(
            [self.table, keyed], promote_options="permissive")
        if merged.num_rows > self.limit:
            merged = merged.sort_by(_KEY).slice(0, self.limit)
        self.table = merged

    def result(self, columns: list[str]) -> pa.Table:
        if self.table is None:
            return pa.table({name: pa.array([], pa.string()) for name in columns})
        return self.table.drop_columns([_KEY])


def _schema(shard: Location) -> pa.Schema:
    try:
        with shard.fs.open_input_file(shard.path) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(shard, "read", error) from None


def _read(shard: Location, columns: list[str]) -> pa.Table:
    """The named columns of one shard; absent ones come back as nulls."""
    try:
        with shard.fs.open_input_file(shard.path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            table = parquet.read(columns=[c for c in dict.fromkeys(columns) if c in names])
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(shard, "read", error) from None
    for name in dict.fromkeys(columns):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(list(dict.fromkeys(columns)))


def find_columns(summary: dict[str, Any], names: set[str]) -> Columns:
    """The columns each section reads, from what the steps said of themselves in the summary
    (Step.describe): `rewrites_instruction`, `label_columns`, `duplicate_column`."""
    steps = summary.get("steps", [])
    refine = next((s for s in steps if s.get("rewrites_instruction") in names), None)
    refine_column = refine["rewrites_instruction"] if refine else None
    scores = sorted(n for n in names if n.endswith("_confidence") or n.startswith("score_"))
    labels = [c for c in dict.fromkeys(c for s in steps for c in s.get("label_columns", []))
              if c in names]
    return Columns(
        instruction_after=refine_column or INSTRUCTION,
        refine_column=refine_column,
        refine_step=refine["name"] if refine else None,
        scores=scores,
        labels=labels,
        generating=[s["name"] for s in steps if f"{s['name']}_parent_id" in names],
        dedup=[s["name"] for s in steps if s.get("duplicate_column") in names],
    )


def _float_columns(schemas: list[pa.Schema], names: list[str]) -> list[str]:
    types = {f.name: f.type for schema in schemas for f in schema}
    return [n for n in names if pa.types.is_floating(types[n])]


def _count(counter: Counter[str], column: pa.ChunkedArray | pa.Array) -> None:
    for item in pc.value_counts(column).to_pylist():
        if item["values"] is not None:
            counter[str(item["values"])] += item["counts"]


def _duplicate_targets(table: pa.Table, step: str) -> list[str]:
    """The kept ids that the duplicates rejected by `step` point at: `<step>_duplicate_of`,
    else parsed from reject_detail ("duplicate of <id>")."""
    mine = table.filter(pc.equal(table[REJECT_STEP], step))
    column = f"{step}_duplicate_of"
    targets = mine[column].to_pylist() if column in mine.column_names else [None] * len(mine)
    details = mine[REJECT_DETAIL].to_pylist()
    out = []
    for target, detail in zip(targets, details, strict=True):
        if target is None and detail:
            match = _DUPLICATE_OF.match(detail)
            target = match.group(1) if match else None
        if target is not None:
            out.append(str(target))
    return out


def load_run(output: Location, limit: int = SAMPLE_LIMIT, samples: int = 5) -> RunView:
    require_committed(output, "the report")
    summary = read_json(output, SUMMARY)
    manifest = read_json(output, MANIFEST)
    data = committed_files(output, manifest, "files")
    rejects = committed_files(output, manifest, "reject_files", optional=True)
    schemas = [_schema(shards[0]) for shards in (data, rejects) if shards]
    names = {name for schema in schemas for name in schema.names}
    columns = find_columns(summary, names)
    columns.scores = _float_columns(schemas, columns.scores)

    parent_columns = [f"{step}_parent_id" for step in columns.generating]
    after_columns = list(dict.fromkeys([
        ID, ORIGIN_STEP, INSTRUCTION, columns.instruction_after, OUTPUT, *columns.scores,
        *columns.labels, *parent_columns]))
    before_columns = [ID, INSTRUCTION, OUTPUT]
    before, after, rejected = Reservoir(limit), Reservoir(limit), Reservoir(limit)
    labels_before: dict[str, Counter[str]] = {c: Counter() for c in columns.labels}
    labels_after: dict[str, Counter[str]] = {c: Counter() for c in columns.labels}

    for shard in data:
        table = _read(shard, after_columns)
        after.add(table)
        seeds = table.filter(pc.equal(table[ORIGIN_STEP], INPUT_STEP))
        before.add(seeds.select(before_columns))
        for name in columns.labels:
            _count(labels_after[name], table[name])
            _count(labels_before[name], seeds[name])

    clusters: dict[str, Counter[str]] = {step: Counter() for step in columns.dedup}
    examples: dict[tuple[str, str], str] = {}
    reject_columns = list(dict.fromkeys([
        ID, ORIGIN_STEP, INSTRUCTION, OUTPUT, REJECT_STEP, REJECT_REASON, REJECT_DETAIL,
        *columns.scores, *columns.labels,
        *(f"{step}_duplicate_of" for step in columns.dedup)]))
    for shard in rejects:
        table = _read(shard, reject_columns)
        seeds = table.filter(pc.equal(table[ORIGIN_STEP], INPUT_STEP))
        before.add(seeds.select(before_columns))
        if columns.scores:
            rejected.add(table.select(columns.scores))
        else:
            rejected.seen += table.num_rows
        for name in columns.labels:
            _count(labels_before[name], seeds[name])
        for step in columns.dedup:
            clusters[step].update(_duplicate_targets(table, step))
        for step, reason, detail in zip(table[REJECT_STEP].to_pylist(),
                                        table[REJECT_REASON].to_pylist(),
                                        table[REJECT_DETAIL].to_pylist(), strict=True):
            if detail and (step, reason) not in examples:
                examples[(str(step), str(reason))] = str(detail)

    view = RunView(
        uri=summary.get("output", {}).get("uri", redact_uri(output.uri)),
        summary=summary, manifest=manifest, columns=columns,
        before=before.result(before_columns), before_total=before.seen,
        after=after.result(after_columns), after_total=after.seen,
        rejected=rejected.result(columns.scores), rejected_total=rejected.seen,
        labels_before=labels_before, labels_after=labels_after,
        # a cluster is the kept row plus every row that duplicates it
        clusters={step: Counter({kept: n + 1 for kept, n in counts.items()})
                  for step, counts in clusters.items()},
        reject_examples=examples,
    )
    view.parents = _parents(view, data + rejects, samples)
    return view


def created_rows(view: RunView, limit: int) -> list[dict[str, Any]]:
    """A few kept rows created by a generating step, ordered by id (stable across runs)."""
    rows = []
    for step in view.columns.generating:
        column = f"{step}_parent_id"
        mine = view.after.filter(pc.is_valid(view.after[column]))
        mine = mine.sort_by(ID).slice(0, limit).to_pylist()
        rows += [{**row, "_step": step, "_parent": row[column]} for row in mine]
    return rows


def _parents(view: RunView, shards: list[Location], limit: int) -> dict[str, dict[str, Any]]:
    wanted = {row["_parent"] for row in created_rows(view, limit)}
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    value_set = pa.array(sorted(wanted), pa.string())
    for shard in shards:
        ids = _read(shard, [ID])
        if not pc.any(pc.is_in(ids[ID], value_set=value_set)).as_py():
            continue
        table = _read(shard, [ID, INSTRUCTION, OUTPUT])
        for row in table.filter(pc.is_in(table[ID], value_set=value_set)).to_pylist():
            found[row[ID]] = row
        if len(found) == len(wanted):
            break
    return found
