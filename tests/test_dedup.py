"""Exact and near dedup: MinHash accuracy, clustering, and whole-dataset runs on a real Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from augment_ray.config.job import parse_job
from augment_ray.curate import minhash
from augment_ray.curate.components import components
from augment_ray.errors import InputDataError
from augment_ray.pipeline import run_job
from augment_ray.steps.dedup import (
    DedupExactStep,
    DedupExactStepSpec,
    DedupNearStep,
    DedupNearStepSpec,
    _exact_groups,
    mark_duplicates,
)

# real GSM8K test questions bundled with the example jobs (MIT, see jobs/data/eval/LICENSE.md)
GSM8K = Path(__file__).resolve().parents[1] / "jobs" / "data" / "eval" / "gsm8k_test_200.jsonl"


def gsm8k_questions(n: int) -> list[str]:
    with GSM8K.open() as handle:
        questions = [json.loads(line)["question"] for _, line in zip(range(n), handle,
                                                                      strict=False)]
    assert len(questions) == n
    return questions


def char_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text: str) -> set[str]:
        text = " ".join(text.lower().split())
        return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def rows(ids: list[str], texts: list[str | None]) -> pa.Table:
    n = len(ids)
    return pa.table({
        "id": ids, "instruction": pa.array(texts, pa.string()), "input": pa.nulls(n, pa.string()),
        "source_id": ids, "origin_step": ["input"] * n,
        "reject_step": pa.nulls(n, pa.string()), "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


# ------------------------------------------------------------------ units


def test_minhash_estimates_exact_jaccard_on_real_text():
    questions = gsm8k_questions(200)
    edited = [q.replace(" the ", " one ", 2) for q in questions]
    texts = pa.array([t.lower() for pair in zip(questions, edited, strict=True) for t in pair])
    hashes, owner = minhash.shingle_hashes(texts, "char", 5)
    sig = minhash.signatures(hashes, owner, len(texts), minhash.Permutations.make(256, 3))
    estimate = minhash.estimated_jaccard(sig[0::2], sig[1::2])
    exact = np.array([char_jaccard(q, e) for q, e in zip(questions, edited, strict=True)])
    assert np.abs(estimate - exact).mean() < 0.03  # sd of a 256-perm estimate is <= 0.031
    assert exact.min() < 0.95  # the edits changed something


def test_short_and_empty_texts_get_shingles_only_when_they_have_text():
    hashes, owner = minhash.shingle_hashes(pa.array(["ab", "", "hello world"]), "word", 3)
    assert owner.tolist() == [0, 2]  # one shingle each for the short rows, none for empty
    again, _ = minhash.shingle_hashes(pa.array(["ab", "hello world"]), "word", 3)
    assert hashes.tolist() == again.tolist()  # deterministic, independent of batch neighbours


def test_components_join_transitively_and_keep_the_lowest_id():
    keepers = components(pa.array(["c", "b", "z", "y"]), pa.array(["b", "a", "y", "x"]))
    assert dict(zip(keepers["id"].to_pylist(), keepers["keeper"].to_pylist(),
                    strict=True)) == {"b": "a", "c": "a", "y": "x", "z": "x"}
    assert components(pa.array([], pa.string()), pa.array([], pa.string())).num_rows == 0


def test_exact_groups_refuse_repeated_ids():
    table = pa.table({"part": pa.array([1, 1], pa.uint64()),
                      "key": pa.array([b"k" * 16] * 2, pa.binary(16)), "id": ["x", "x"]})
    with pytest.raises(InputDataError, match="'x' is on more than one row"):
        _exact_groups(table, "dedup_exact")


def test_mark_leaves_rejected_rows_and_names_the_kept_row():
    table = rows(["a", "b", "c"], ["t", "t", "t"])
    table = table.set_column(table.schema.get_field_index("reject_step"), "reject_step",
                             pa.array([None, None, "filter"]))
    keepers = pa.table({"id": ["b", "c"], "keeper": ["a", "a"]})
    out = mark_duplicates(table, keepers, "dd", "exact_duplicate").to_pylist()
    assert [r["reject_reason"] for r in out] == [None, "exact_duplicate", None]
    assert out[1]["reject_detail"] == "duplicate of a"
    assert [r["dd_duplicate_of"] for r in out] == [None, "a", None]


# ------------------------------------------------------------------ on Ray


def outcome(ds: ray.data.Dataset, column: str) -> dict[str, tuple]:
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return {r["id"]: (r["reject_reason"], r[column]) for r in table.to_pylist()}


def transitive_texts() -> tuple[str, str, str]:
    words = " ".join(gsm8k_questions(3)).split()[:60]
    a = " ".join(words)
    tail = ["alpha", "beta", "gamma", "delta"]
    b = " ".join([*words[:-4], *tail])
    c = " ".join(["one", "two", "three", "four", *words[4:-4], *tail])
    return a, b, c


def test_near_dedup_clusters_transitively(local_ray):
    a, b, c = transitive_texts()
    assert char_jaccard(a, b) >= 0.85 and char_jaccard(b, c) >= 0.85
    assert char_jaccard(a, c) < 0.8  # a and c are only linked through b
    step = DedupNearStep(DedupNearStepSpec(kind="dedup_near", columns=["instruction"]))
    other = gsm8k_questions(10)[5]
    ds = ray.data.from_arrow(rows(["r1", "r2", "r3", "r4"], [a, b, c, other]))
    result = outcome(step.apply(ds), "dedup_near_duplicate_of")
    assert result == {"r1": (None, None), "r2": ("near_duplicate", "r1"),
                      "r3": ("near_duplicate", "r1"), "r4": (None, None)}


def planted(n: int) -> pa.Table:
    """n real questions plus exact copies (case/space changes) and light word edits."""
    questions = gsm8k_questions(n)
    texts = list(questions)
    texts += [q.upper() for q in questions[: n // 4]]
    texts += ["  ".join(q.split()) for q in questions[n // 4: n // 2]]
    texts += [q.replace(" the ", " a ", 1) + " Explain." for q in questions[n // 2:]]
    ids = [f"id{(i * 7919) % 1000:04d}-{i}" for i in range(len(texts))]  # ids not in text order
    return rows(ids, texts)


@pytest.mark.parametrize("kind", ["dedup_exact", "dedup_near"])
def test_same_rows_kept_whatever_the_partitioning(local_ray, kind):
    table = planted(120)
    spec = (DedupExactStepSpec if kind == "dedup_exact" else DedupNearStepSpec)(kind=kind)
    build = DedupExactStep if kind == "dedup_exact" else DedupNearStep
    column = f"{kind}_duplicate_of"
    whole = outcome(build(spec).apply(ray.data.from_arrow(table)), column)
    order = np.random.default_rng(0).permutation(len(table))
    shuffled = table.take(pa.array(order))
    blocks = [shuffled.slice(i, 17) for i in range(0, len(shuffled), 17)]
    split = outcome(build(spec).apply(ray.data.from_arrow(blocks)), column)
    assert whole == split
    removed = sum(1 for reason, _ in whole.values() if reason)
    assert removed >= (60 if kind == "dedup_exact" else 100)
    # every removed row points at a kept row
    kept = {i for i, (reason, _) in whole.items() if reason is None}
    assert all(keeper in kept for reason, keeper in whole.values() if reason)


def test_exact_dedup_folds_unicode_case_and_space(local_ray):
    table = rows(["b", "a", "c", "d", "e"],
                 ["\uff28\uff45\uff4c\uff4c\uff4f  World",  # fullwidth "Hello"
                  "hello world", "HELLO\tWORLD ", "你好 世界", "你好世界"])
    step = DedupExactStep(DedupExactStepSpec(kind="dedup_exact"))
    result = outcome(step.apply(ray.data.from_arrow(table)), "dedup_exact_duplicate_of")
    assert result == {"a": (None, None), "b": ("exact_duplicate", "a"),
                      "c": ("exact_duplicate", "a"), "d": (None, None), "e": (None, None)}


def test_nulls_empty_and_one_row_inputs(local_ray):
    step = DedupExactStep(DedupExactStepSpec(kind="dedup_exact", columns=["instruction"]))
    table = rows(["a", "b", "c", "d"], [None, None, "", "x"])
    result = outcome(step.apply(ray.data.from_arrow(table)), "dedup_exact_duplicate_of")
    assert all(reason is None for reason, _ in result.values())  # no text: never a duplicate
    one = DedupNearStep(DedupNearStepSpec(kind="dedup_near"))
    assert outcome(one.apply(ray.data.from_arrow(rows(["a"], ["x y z"]))),
                   "dedup_near_duplicate_of") == {"a": (None, None)}
    empty = DedupNearStep(DedupNearStepSpec(kind="dedup_near"))
    assert empty.apply(ray.data.from_arrow(rows([], []))).count() == 0


def test_job_with_a_non_text_column_fails_clearly(local_ray, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.table({"instruction": ["a", "b"], "score": [1, 2]}),
                   source / "part-0.parquet")
    job = parse_job({"input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
                     "steps": [{"kind": "dedup_near", "columns": ["instruction", "score"]}]})
    with pytest.raises(InputDataError, match="'score', which holds int64, not text"):
        run_job(job)


def test_whole_job_nothing_lost_across_shards(local_ray, tmp_path):
    table = planted(80).select(["instruction"])
    source = tmp_path / "in"
    source.mkdir()
    for i in range(3):  # the same rows spread over 3 files: ids must still be unique
        pq.write_table(table.take(pa.array(range(i, len(table), 3))), source / f"p{i}.parquet")
    pq.write_table(table.slice(0, 5), source / "p3.parquet")  # repeats across files
    job = parse_job({"input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
                     "steps": [{"kind": "dedup_exact"}, {"kind": "dedup_near"}]})
    summary = run_job(job)
    kept = pq.read_table(tmp_path / "out" / "data")
    rejected = pq.read_table(tmp_path / "out" / "_rejects")
    assert kept.num_rows + rejected.num_rows == len(table) + 5
    reasons = set(rejected["reject_reason"].to_pylist())
    assert reasons == {"exact_duplicate", "near_duplicate"}
    assert kept.num_rows == 80  # one row per original question
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["dedup_exact"]["rejected"]["exact_duplicate"] == 40 + 5
