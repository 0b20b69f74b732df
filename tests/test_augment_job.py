"""expand -> respond chained in one job, with the real bundled model on a real local Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.job import parse_job
from augment_ray.pipeline import run_job
from augment_ray.rows import derived_id
from augment_ray.tasks.classify import TASK_CATEGORIES
from augment_ray.validate.checks import PairChecks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"


def read_folder(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def job_on_seeds(tmp_path: Path, job_file: str, n: int) -> tuple[list[dict], dict]:
    """The first n sample seeds as one Parquet shard, and the example job's spec (as a dict)
    pointed at them, writing under tmp_path/out."""
    seeds = pq.read_table(SAMPLE).slice(0, n).to_pylist()
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(seeds), source / "part-0.parquet")
    data = yaml.safe_load((ROOT / "jobs" / job_file).read_text())
    data["input"]["uri"] = str(source)
    data["output"]["uri"] = str(tmp_path / "out")
    return seeds, data


def test_expand_then_respond_links_every_new_row_to_its_seed(local_ray, tmp_path):
    seeds, data = job_on_seeds(tmp_path, "expand_respond.yaml", 3)
    data["engines"]["small"]["batch_size"] = 8
    data["steps"][0]["sampling"]["max_tokens"] = 24
    data["steps"][1]["sampling"]["max_tokens"] = 12

    summary = run_job(parse_job(data))

    kept = read_folder(tmp_path / "out" / "data")
    rejected = read_folder(tmp_path / "out" / "_rejects")
    everything = kept + rejected
    seed_ids = {s["id"] for s in seeds}
    created = [r for r in everything if r["origin_step"] == "expand"]
    # nothing lost: 3 seeds + 2 new rows per seed, each in output or rejects
    assert len(everything) == 9
    assert {r["id"] for r in everything if r["origin_step"] == "input"} == seed_ids
    assert sorted(r["id"] for r in created) == sorted(
        derived_id(seed, "expand", k) for seed in seed_ids for k in range(2)
    )
    for row in created:
        assert row["expand_parent_id"] in seed_ids
        assert row["source_id"] == row["expand_parent_id"]
        assert row["expand_model"] == "SmolLM2-135M-Instruct"
        assert row["expand_template"] == "expand.v1"
        if row.get("reject_reason") is None:
            assert row["instruction"].strip()
        else:  # a rejected generation keeps the model's raw text for inspection
            assert row["reject_step"] in ("expand", "respond")
    for row in kept:
        assert row["output"].strip()
        assert row["respond_completion_tokens"] >= 1
    for row in kept:
        if row["origin_step"] == "input":  # the seed's own response is kept for audit
            original = next(s for s in seeds if s["id"] == row["id"])
            assert row["respond_previous_output"] == original["output"]
    steps = {step["name"]: step for step in summary["steps"]}
    assert steps["expand"]["rows_in"] == 3
    assert steps["expand"]["rows_created"] == 6
    assert steps["respond"]["rows_in"] == steps["expand"]["rows_out"]
    # both steps name one engine: one pool of 2 replicas, each loading the model once
    assert steps["respond"]["pool_shared_by"] == ["expand", "respond"]
    assert summary["model_loads"] == {"small": 2}
    assert summary["rows_out"] + summary["rows_rejected"] == 9


def test_pair_expand_writes_new_pairs_or_rejects_them_with_the_raw_text(local_ray, tmp_path):
    _, data = job_on_seeds(tmp_path, "pair_expand.yaml", 3)
    data["engines"]["small"]["sampling"]["max_tokens"] = 48
    data["steps"][0]["max_retries"] = 1

    summary = run_job(parse_job(data))

    everything = read_folder(tmp_path / "out" / "data") + read_folder(tmp_path / "out" / "_rejects")
    created = [r for r in everything if r["origin_step"] == "pair_expand"]
    assert len(everything) == 6 and len(created) == 3
    for row in created:
        assert row["id"] == derived_id(row["pair_expand_parent_id"], "pair_expand", 0)
        if row.get("reject_reason") is None:
            assert row["instruction"].strip() and row["output"].strip()
        else:
            assert row["reject_reason"] in ("unparsable_pair", "copy_of_seed", "empty_output",
                                            *PairChecks().describe())
            assert row["reject_detail"]  # the raw model text, for inspection
            # an unparsable answer is asked again (max_retries 1); one that fails a check is
            # not, by default: it may have been the first answer or the retried one
            assert row["pair_expand_attempts"] in (
                (1, 2) if row["reject_reason"] in PairChecks().describe() else (2,))
    assert summary["steps"][1]["rows_created"] == 3


def test_classify_then_resample_accounts_for_every_row(local_ray, tmp_path):
    seeds, data = job_on_seeds(tmp_path, "classify_resample.yaml", 8)

    summary = run_job(parse_job(data))

    kept = read_folder(tmp_path / "out" / "data")
    rejected = read_folder(tmp_path / "out" / "_rejects")
    inputs = [r for r in kept + rejected if r["origin_step"] == "input"]
    assert sorted(r["id"] for r in inputs) == sorted(s["id"] for s in seeds)
    for row in kept:
        assert row["task_category"] in TASK_CATEGORIES
        assert row["language"] == "en"
    for row in rejected:
        assert row["reject_reason"] in ("resampled_out", "unknown_category")
    repeats = [r for r in kept if r["origin_step"] == "resample"]
    assert all(r["source_id"] in {s["id"] for s in seeds} for r in repeats)
    steps = {step["name"]: step for step in summary["steps"]}
    assert sum(steps["resample"]["group_counts"].values()) == steps["resample"]["rows_in"]
    assert steps["resample"]["rows_created"] == len(repeats)
