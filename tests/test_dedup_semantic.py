"""Semantic dedup: k-means and pair arithmetic, the vector journal, and real runs (the bundled
MiniLM on a real local Ray, and the CLI) on real seed tasks with hand-picked rewordings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
import yaml

from augment_ray.curate import kmeans
from augment_ray.engines.embedding_engine import EmbeddingEngineSpec, SentenceTransformersEngine
from augment_ray.io.journal import EmbeddingJournal, embedding_key
from augment_ray.steps.dedup_semantic import (
    DedupSemanticStep,
    DedupSemanticStepSpec,
    assign_groups,
    mark_semantic,
)
from augment_ray.steps.embedding_pool import row_texts, vector_array, vector_matrix
from augment_ray.storage import location

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.87

# id -> instruction. Seed tasks (Self-Instruct, Apache-2.0) that are all distinct (cosine <= 0.55
# to each other), rewordings of four of them, and a chain p1 ~ p2 ~ p3 where p1 and p3 are
# further apart than the threshold. Ids are chosen so the rewording is sometimes the keeper.
ROWS = {
    "a01": "Explain the following idiom to me, and try to give me some examples.",
    "a02": "Can you describe the below idiom to me, and try to give me a few instances?",
    "b02": "Create a survey that asks about eating and cooking habits.",
    "b01": "Make a survey that asks regarding eating and cooking habits.",
    "c01": "What is the relation between the given pairs?",
    "c02": "Here is my request: What is the relation between the provided pairs?",
    "d01": "Find the four smallest perfect numbers.",
    "d02": "I need you to identify the four smallest perfect numbers.",
    "p2": "Explain how photosynthesis works in plants and algae.",
    "p1": "Explain how photosynthesis works in plants.",
    "p3": "Explain how photosynthesis works in algae.",
    "s01": "Brainstorm a list of possible New Year's resolutions.",
    "s02": "Make a grocery list for a healthy meal.",
    "s03": "Suggest some games that can be played by a group of people.",
    "s04": "Generate a haiku using the following word:",
    "s05": "Reply to the email and refuse the invitation politely.",
    "s06": "Recommend a movie for me to watch during the weekend and explain the reason.",
    "s07": "Give me a cooking recipe for the following food.",
    "s08": "Create a birthday planning checklist.",
    "s09": "Solve the equation and find the value of X. Show your steps.",
    "s10": "Come up with the synonyms of the word.",
    "s11": "Write a knock knock joke about bananas.",
}
# what must happen: id -> the id it is a duplicate of (absent: kept)
EXPECTED = {"a02": "a01", "b02": "b01", "c02": "c01", "d02": "d01", "p2": "p1", "p3": "p1"}


def rows(ids: list[str], texts: list[str | None], rejected: dict[str, str] | None = None
         ) -> pa.Table:
    rejected = rejected or {}
    n = len(ids)
    return pa.table({
        "id": ids, "instruction": pa.array(texts, pa.string()), "input": pa.nulls(n, pa.string()),
        "source_id": ids, "origin_step": ["input"] * n,
        "reject_step": pa.array([rejected.get(i) for i in ids], pa.string()),
        "reject_reason": pa.array([rejected.get(i) and "too_short" for i in ids], pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


def planted() -> pa.Table:
    return rows(list(ROWS), list(ROWS.values()))


def step(**fields) -> DedupSemanticStep:
    return DedupSemanticStep(DedupSemanticStepSpec(
        kind="dedup_semantic", columns=["instruction"], threshold=THRESHOLD, **fields))


def outcome(ds: ray.data.Dataset) -> dict[str, tuple]:
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert "_dedup_semantic_vector" not in table.column_names  # internal, never written
    return {r["id"]: (r["reject_reason"], r["dedup_semantic_duplicate_of"])
            for r in table.to_pylist()}


def expected_outcome() -> dict[str, tuple]:
    return {i: (("semantic_duplicate", EXPECTED[i]) if i in EXPECTED else (None, None))
            for i in ROWS}


# ------------------------------------------------------------------ the CLI (its own Ray)


@pytest.mark.integration
def test_cli_run_over_three_files_prints_the_step_line_and_accounts_for_every_row(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    table = planted().select(["id", "instruction"])
    for i in range(3):  # rows of a group spread over different files
        pq.write_table(table.take(pa.array(range(i, len(table), 3))), source / f"p{i}.parquet")
    job = {"name": "semantic", "input": {"uri": str(source)},
           "output": {"uri": str(tmp_path / "out"), "mode": "overwrite"},
           "steps": [{"kind": "dedup_semantic", "columns": ["instruction"],
                      "threshold": THRESHOLD, "clusters": 3}]}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    line = re.compile(r"^  dedup_semantic\s+in\s+22  out\s+16  cosine >= 0\.87, 3 k-means "
                      r"clusters$", re.M)
    assert line.search(done.stdout), done.stdout
    assert re.search(r"^      rejected\s+6  semantic_duplicate$", done.stdout, re.M)
    out = tmp_path / "out"
    kept = pq.read_table(out / "data")
    rejected = pq.read_table(out / "_rejects")
    assert kept.num_rows + rejected.num_rows == len(ROWS)
    assert sorted(kept["id"].to_pylist()) == sorted(set(ROWS) - set(EXPECTED))
    assert dict(zip(rejected["id"].to_pylist(),
                    rejected["dedup_semantic_duplicate_of"].to_pylist(), strict=True)) == EXPECTED
    assert "_dedup_semantic_vector" not in kept.column_names
    summary = json.loads((out / "_summary.json").read_text())
    entry = summary["steps"][-1]
    assert entry["note"] == "cosine >= 0.87, 3 k-means clusters"
    assert (entry["rows_embedded"], entry["duplicates"], entry["clusters"]) == (22, 6, 5)
    assert entry["model"] == "all-MiniLM-L6-v2" and entry["duplicate_column"] == \
        "dedup_semantic_duplicate_of"
    assert not (out / "_work").exists()  # the journal goes once the run commits


# ------------------------------------------------------------------ units


def test_kmeans_is_seeded_and_assigns_to_the_nearest_centroid():
    rng = np.random.default_rng(0)
    centers = kmeans.unit(rng.normal(size=(4, 16)))
    x = kmeans.unit(np.repeat(centers, 50, axis=0) + rng.normal(0, 0.05, (200, 16)))
    first, iterations = kmeans.spherical_kmeans(x, 4, seed=3, max_iterations=50)
    again, _ = kmeans.spherical_kmeans(x, 4, seed=3, max_iterations=50)
    assert np.array_equal(first, again) and iterations < 50
    assert not np.array_equal(first, kmeans.spherical_kmeans(x, 4, seed=4, max_iterations=50)[0])
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    labels = kmeans.nearest(x, first)
    assert np.array_equal(labels, np.argmax(x @ first.T, axis=1))
    # a converged centroid is the normalized mean of its rows
    for c in set(labels.tolist()):
        assert np.allclose(kmeans.unit(x[labels == c].mean(axis=0, keepdims=True))[0],
                           first[c], atol=1e-5)
    assert kmeans.spherical_kmeans(x[:3], 10, 1, 5)[0].shape == (3, 16)  # k <= rows


def test_similar_groups_join_transitively_under_the_lowest_index(monkeypatch):
    a = np.array([1.0, 0.0, 0.0])
    b = kmeans.unit(np.array([[1.0, 0.45, 0.0]]))[0]  # ~0.91 to a and to c
    c = kmeans.unit(np.array([[1.0, 0.95, 0.0]]))[0]  # ~0.72 to a
    far = np.array([0.0, 0.0, 1.0])
    x = np.stack([far, a, b, c]).astype(np.float32)
    labels, pairs = kmeans.similar_groups(x, 0.9)
    assert labels.tolist() == [0, 1, 1, 1] and pairs == 2
    monkeypatch.setattr(kmeans, "TILE", 1)  # every pair in its own tile
    monkeypatch.setattr(kmeans, "EDGE_BUDGET", 0)  # folding into stars as it goes
    assert kmeans.similar_groups(x, 0.9)[0].tolist() == [0, 1, 1, 1]
    assert kmeans.label_components(3, np.array([2]), np.array([1])).tolist() == [0, 1, 1]
    assert [kmeans.default_clusters(n) for n in (1, 22, 20_000, 10**6, 4 * 10**6)] == [
        1, 1, 20, 1000, 2000]


def test_vector_columns_round_trip_with_nulls_and_texts_skip_rejected_and_blank_rows():
    table = rows(["a", "b", "c", "d"], ["one", None, "  ", "four"], rejected={"d": "filter"})
    assert row_texts(table, ["instruction", "input"], "s") == ["one\n", None, None, None]
    vectors = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    column = vector_array(4, [0, 3], vectors, 2, "float16")
    assert column.type == pa.list_(pa.float16(), 2) and column.null_count == 2
    where, matrix = vector_matrix(pa.chunked_array([column.slice(0, 1), column.slice(1)]))
    assert where.tolist() == [0, 3]
    assert np.allclose(matrix.astype(np.float32), vectors, atol=1e-3)
    assert assign_groups([3, 3, 10, 0, 1], 6) == [[0, 1], [2], [3, 4]]


def test_mark_names_the_kept_row_and_its_cosine_and_leaves_rejected_rows():
    table = rows(["a", "b", "c", "d"], ["x"] * 4, rejected={"d": "filter"})
    vectors = np.array([[1, 0], [0.95, 0.3122], [0.8, 0.6], [1, 0]], dtype=np.float32)
    table = table.append_column("_v", vector_array(4, [0, 1, 2], vectors[:3], 2, "float16"))
    keepers = pa.table({"id": ["b", "c", "d"], "keeper": ["a", "a", "a"]})
    keeper_vectors = pa.table({"id": ["a"], "vector": table["_v"].slice(0, 1)})
    out = mark_semantic(table, keepers, keeper_vectors, "dd", "_v", 0.9)
    assert "_v" not in out.column_names
    result = out.to_pylist()
    assert [r["reject_reason"] for r in result] == [None, "semantic_duplicate",
                                                    "semantic_duplicate", "too_short"]
    assert result[1]["reject_detail"] == "duplicate of a (cosine 0.950)"
    assert result[2]["reject_detail"] == (
        "duplicate of a (cosine 0.800, linked through rows with cosine >= 0.9)")
    assert [r["dd_duplicate_of"] for r in result] == [None, "a", "a", None]


def test_a_row_on_a_cluster_border_joins_its_second_cluster_too():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = kmeans.unit(np.array([[1.0, 0.1], [1.0, 0.98], [0.2, 1.0]]))
    first, second, gap = kmeans.nearest_two(x, centroids)
    assert first.tolist() == [0, 0, 1] and second.tolist() == [1, 1, 0]
    assert (gap[1] < 0.02) and (gap[0] > 0.5)
    one = kmeans.nearest_two(x, centroids[:1])
    assert one[0].tolist() == one[1].tolist() == [0, 0, 0] and np.isinf(one[2]).all()


# ------------------------------------------------------------------ the real model on Ray


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    engine = SentenceTransformersEngine(EmbeddingEngineSpec())
    return dict(zip(ROWS, engine.embed(list(ROWS.values())), strict=True))


@pytest.mark.integration
def test_the_planted_texts_are_what_the_tests_say(vectors):
    def cos(a: str, b: str) -> float:
        return float(vectors[a] @ vectors[b])

    for row, kept in EXPECTED.items():
        if row != "p3":
            assert cos(row, kept) >= THRESHOLD + 0.02, (row, cos(row, kept))
    assert cos("p2", "p3") >= THRESHOLD + 0.02
    assert cos("p1", "p3") <= THRESHOLD - 0.02  # p3 joins p1 only through p2
    distinct = [i for i in ROWS if i not in EXPECTED]
    worst = max(cos(a, b) for a in distinct for b in distinct if a < b)
    assert worst <= 0.6


@pytest.mark.integration
def test_rewordings_go_distinct_rows_stay_whatever_the_partitioning(local_ray):
    table = planted()
    whole = outcome(step().apply(ray.data.from_arrow(table)))  # 1 cluster: every pair
    assert whole == expected_outcome()
    order = np.random.default_rng(0).permutation(len(table))
    shuffled = table.take(pa.array(order))
    blocks = [shuffled.slice(i, 8) for i in range(0, len(shuffled), 8)]
    three = step(clusters=3)
    assert outcome(three.apply(ray.data.from_arrow(blocks))) == whole  # 3 blocks, 3 clusters
    assert three.stats["kmeans_clusters"] == 3
    assert outcome(step(clusters=3).apply(ray.data.from_arrow(table))) == whole


@pytest.mark.integration
def test_rejected_and_empty_rows_pass_through_and_are_never_keepers(local_ray):
    ids = [*ROWS, "e1", "e2"]
    table = rows(ids, [*ROWS.values(), "", None], rejected={"a01": "filter"})
    dedup = step()
    result = outcome(dedup.apply(ray.data.from_arrow(table)))
    assert result["a01"] == ("too_short", None)  # an earlier step's reject is untouched
    assert result["a02"] == (None, None)  # its rewording is now the only live copy
    assert result["e1"] == result["e2"] == (None, None)
    assert len(result) == len(ids)
    assert dedup.stats["rows_embedded"] == len(ROWS) - 1
    assert dedup.describe()["note"].startswith("cosine >= 0.87, ")


@pytest.mark.integration
def test_vector_journal_replays_what_an_earlier_attempt_embedded(local_ray, tmp_path):
    work = location(str(tmp_path / "_work"), None)
    asked: list[str] = []

    def embed(texts: list[str]) -> np.ndarray:
        asked.extend(texts)
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    first = EmbeddingJournal.open(work, "dedup_semantic", "run1")
    first.embed(embed, "model-a", ["xx", "yyy"])
    second = EmbeddingJournal.open(work, "dedup_semantic", "run2")
    assert second.earlier_count == 2
    out = second.embed(embed, "model-a", ["yyy", "zzzz", "xx"])
    assert asked == ["xx", "yyy", "zzzz"]  # only the new text is embedded again
    assert out.tolist() == [[3.0, 1.0], [4.0, 1.0], [2.0, 1.0]]
    assert embedding_key("model-a", "xx") != embedding_key("model-b", "xx")
    assert second.embed(embed, "model-b", ["xx"]).tolist() == [[2.0, 1.0]]
    assert asked[-1] == "xx"  # another model: not replayed


@pytest.mark.integration
def test_a_resumed_run_replays_the_vectors_its_earlier_attempt_journaled(local_ray, tmp_path):
    from augment_ray.config.job import parse_job
    from augment_ray.io.committed import STARTED, spec_digest
    from augment_ray.io.journal import WORK_DIR
    from augment_ray.io.write import write_json
    from augment_ray.pipeline import run_job
    from augment_ray.steps.embedding_pool import model_key

    source = tmp_path / "in"
    source.mkdir()
    ids = ["s01", "s02", "s03", "s04"]
    pq.write_table(pa.table({"id": ids, "instruction": [ROWS[i] for i in ids]}),
                   source / "part-0.parquet")
    job = parse_job({"input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
                     "steps": [{"kind": "dedup_semantic", "columns": ["instruction"]}]})
    (tmp_path / "out").mkdir()
    output = location(str(tmp_path / "out"), None)
    write_json(output, STARTED, {"run_id": "earlier", "job_digest": spec_digest(job)})
    # the attempt that died journaled s02's vector; a vector the model never gives s02 (s01's)
    # proves that the rerun replays it instead of embedding again
    engine = SentenceTransformersEngine(EmbeddingEngineSpec())
    journal = EmbeddingJournal.open(output.join(WORK_DIR), "dedup_semantic", "earlier")
    journal.record([embedding_key(model_key(EmbeddingEngineSpec()), ROWS["s02"])],
                   list(engine.embed([ROWS["s01"]])))
    summary = run_job(job)
    assert summary["journal"]["dedup_semantic"] == {"replayed": 1, "generated": 3}
    rejected = pq.read_table(tmp_path / "out" / "_rejects").to_pylist()
    assert [(r["id"], r["reject_detail"]) for r in rejected] == [
        ("s02", "duplicate of s01 (cosine 1.000)")]
    assert pq.read_table(tmp_path / "out" / "data").num_rows == 3
