"""The real example job, end to end: local Ray, local files, the bundled model on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from augment_ray.config.job import JobSpec, load_job, parse_job
from augment_ray.errors import StorageError
from augment_ray.pipeline import run_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "jobs" / "refine_seed_tasks.yaml"
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
CLI = [sys.executable, "-m", "augment_ray.cli"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def sample_rows(n: int) -> list[dict]:
    return pq.read_table(SAMPLE).slice(0, n).to_pylist()


def example_job(input_uri: Path, output_uri: Path, max_tokens: int) -> JobSpec:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["input"]["uri"] = str(input_uri)
    data["output"]["uri"] = str(output_uri)
    data["engines"]["small"]["sampling"]["max_tokens"] = max_tokens
    data["engines"]["small"]["batch_size"] = 4
    # 12-token rewrites are cut short: the checks (tests/test_checks_job.py) would reject them
    data["steps"][0]["checks"] = False
    return parse_job(data)


def read_folder(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_example_job_refines_every_row_with_lineage(local_ray, tmp_path):
    rows = sample_rows(6)
    bad = [
        {**rows[0], "id": "bad-null", "instruction": None},
        {**rows[1], "id": "bad-long", "instruction": "x" * 300_000},
    ]
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3] + bad[:1]), source / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:] + bad[1:]), source / "part-1.parquet")
    out = tmp_path / "out"

    summary = run_job(example_job(source, out, max_tokens=12))

    kept = read_folder(out / "data")
    rejected = read_folder(out / "_rejects")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows)
    assert {r["id"]: r["reject_reason"] for r in rejected} == {
        "bad-null": "missing_instruction", "bad-long": "too_long",
    }
    by_id = {r["id"]: r for r in rows}
    for row in kept:
        original = by_id[row["id"]]
        assert row["refined_instruction"].strip()
        assert row["instruction"] == original["instruction"]
        assert row["name"] == original["name"]  # every input column is kept
        assert row["is_classification"] == original["is_classification"]
        assert row["source_id"] == row["id"]
        assert row["refine_model"] == "SmolLM2-135M-Instruct"
        assert row["refine_engine"] == "small"
        assert row["refine_template"] == "refine.v1"
        assert json.loads(row["refine_sampling"])["max_tokens"] == 12
        assert row["refine_prompt_tokens"] > 20
        assert 1 <= row["refine_completion_tokens"] <= 12
        assert row["refine_finish_reason"] in ("stop", "length")
        assert "reject_reason" not in row

    assert summary["rows_in"] == 8
    assert summary["rows_out"] == 6
    assert summary["rows_rejected"] == 2
    assert summary["rejected_by_reason"] == {
        "input:missing_instruction": 1, "input:too_long": 1,
    }
    refine = summary["steps"][1]
    assert (refine["name"], refine["rows_in"], refine["rows_out"]) == ("refine", 6, 6)
    assert refine["completion_tokens"] == sum(r["refine_completion_tokens"] for r in kept)
    assert json.loads((out / "_summary.json").read_text()) == summary
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 6
    assert all((out / name).is_file() for name in manifest["files"] + manifest["reject_files"])
    assert (out / "_SUCCESS").is_file()

    # the default write mode leaves a finished output alone: the same job is a no-op, ...
    job = example_job(source, out, max_tokens=12)
    refuse = job.output.model_copy(update={"mode": "error-if-exists"})
    job = job.model_copy(update={"output": refuse})
    again = run_job(job)
    assert again["skipped"] == "already committed" and again["run_id"] == summary["run_id"]
    # ... and another job is refused
    other = example_job(source, out, max_tokens=13)
    other = other.model_copy(update={"output": refuse})
    with pytest.raises(StorageError, match="committed run of a different job spec"):
        run_job(other)


def test_cli_runs_a_job_file_and_reports(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(
        json.dumps({"prompt": r["instruction"], "answer": r["output"]}) + "\n"
        for r in sample_rows(3)
    ))
    job = {
        "name": "cli-smoke",
        "input": {"uri": str(source), "columns": {"instruction": "prompt", "output": "answer"}},
        "output": {"uri": str(tmp_path / "out")},
        "engines": {"m": {"batch_size": 3, "sampling": {"max_tokens": 8}}},
        "steps": [{"kind": "refine", "engine": "m", "name": "polish", "checks": False}],
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run([*CLI, "run", str(job_file)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 rows in, 3 out, 0 rejected" in done.stdout
    kept = read_folder(tmp_path / "out" / "data")
    assert len(kept) == 3
    assert all(r["refined_instruction"] and r["polish_completion_tokens"] for r in kept)

    again = subprocess.run([*CLI, "summary", str(tmp_path / "out")], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0
    assert "cli-smoke" in again.stdout


def test_cli_errors_are_one_paragraph_with_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {uri: x}\noutput: {uri: y}\nsteps: [{kind: refine, engine: nope}]\n")
    done = subprocess.run([*CLI, "validate", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert "steps[0].engine: 'nope' is not an engine" in done.stderr
    assert "Traceback" not in done.stderr

    missing = tmp_path / "missing.yaml"
    job = load_job(EXAMPLE).model_dump()
    job["input"]["uri"] = str(tmp_path / "no-such-input")
    missing.write_text(yaml.safe_dump(job))
    done = subprocess.run([*CLI, "run", str(missing)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
