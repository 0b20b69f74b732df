"""Resampling: factors toward targets, deterministic per row whatever the partitioning."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from augment_ray.rows import derived_id
from augment_ray.steps.resample import _resample_batch, copies, plan_factors
from augment_ray.tasks.base import ParseFailure
from augment_ray.tasks.classify import ClassifyTask, match_category


def rows_table(groups: list[str]) -> pa.Table:
    n = len(groups)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "task_category": groups,
        "source_id": [f"r{i}" for i in range(n)],
        "origin_step": ["input"] * n,
        "reject_step": pa.nulls(n, pa.string()),
        "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


def test_balanced_factors_and_targets():
    counts = Counter({"math": 300, "writing": 100})
    assert plan_factors(counts, None) == {"math": 200 / 300, "writing": 2.0}
    factors = plan_factors(counts, {"math": 1, "writing": 3})  # same total, 1:3
    assert factors["math"] * 300 == pytest.approx(100)
    assert factors["writing"] * 100 == pytest.approx(300)
    assert plan_factors(Counter({"math": 10, "code": 5}), {"math": 1}) == {"code": 1.0,
                                                                           "math": 1.0}


def test_copies_hit_the_factor_in_expectation():
    total = sum(copies(2.4, 7, f"id{i}") for i in range(5000))
    assert total / 5000 == pytest.approx(2.4, abs=0.05)
    assert {copies(0.0, 1, "x"), copies(1.0, 1, "x")} == {0, 1}


def test_resampling_is_the_same_whatever_the_batching():
    table = rows_table(["math"] * 30 + ["writing"] * 10)
    factors = plan_factors(Counter({"math": 30, "writing": 10}), None)
    whole = _resample_batch(table, ["task_category"], factors, 3, "resample")
    parts = pa.concat_tables(
        _resample_batch(table.slice(i, 7), ["task_category"], factors, 3, "resample")
        for i in range(0, 40, 7)
    )
    key = sorted(zip(whole["id"].to_pylist(), whole["reject_reason"].to_pylist(), strict=True),
                 key=str)
    assert key == sorted(zip(parts["id"].to_pylist(), parts["reject_reason"].to_pylist(),
                             strict=True), key=str)
    live = [r for r in whole.to_pylist() if r["reject_reason"] is None]
    counts = Counter(r["task_category"] for r in live)
    assert 12 <= counts["math"] <= 28 and 12 <= counts["writing"] <= 28  # toward 20 / 20
    # nothing lost: dropped rows are rejected, repeats are new rows with derived ids
    assert {r["id"] for r in whole.to_pylist() if r["origin_step"] == "input"} == {
        f"r{i}" for i in range(40)
    }
    for row in whole.to_pylist():
        if row["origin_step"] == "resample":
            assert row["id"] in {derived_id(row["source_id"], "resample", j) for j in (1, 2, 3)}


def test_classify_parse():
    task = ClassifyTask("task_category", "language")
    assert task.parse({"instruction": "求 2+2"}, "<category>Math</category>") == {
        "task_category": "math", "language": "zh",
    }
    assert task.parse({"instruction": "x"}, "This is code generation.")["task_category"] == (
        "code_generation"
    )
    assert match_category("open-QA") == "open_qa"
    with pytest.raises(ParseFailure) as info:
        task.parse({"instruction": "x"}, "I cannot tell.")
    assert info.value.reason == "unknown_category"
    [[message]] = task.prompts({"instruction": "Sort a list."})
    assert "math, reasoning, code_generation" in message["content"]
    assert message["content"].endswith("between <category> and </category>.")
