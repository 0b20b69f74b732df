"""Progress of a running job: rows per step, tokens/s, ETA, logged by the driver."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from augment_ray.config.job import parse_job
from augment_ray.pipeline import run_job
from augment_ray.progress import StepProgress, format_duration, progress_line

ROOT = Path(__file__).resolve().parents[1]


def test_progress_line_has_rows_share_rate_and_eta():
    snapshot = {"input": StepProgress(rows=100), "refine": StepProgress(rows=25, tokens=500)}
    line = progress_line(["input", "refine", "dedup_exact"], snapshot, total=100, elapsed=50)
    assert line == ("progress: input 100/100 (100%) | refine 25/100 (25%) 10.0 tok/s ETA 2m30s"
                    " | dedup_exact 0/100 (0%)")
    # an input of unknown size (JSONL before every file is read): counts only
    assert progress_line(["input"], {"input": StepProgress(rows=7)}, None, 3) == \
        "progress: input 7"
    assert [format_duration(s) for s in (5, 75, 7300)] == ["5s", "1m15s", "2h01m"]


@pytest.mark.integration
def test_a_run_logs_progress_per_step_until_done(local_ray, tmp_path, monkeypatch, caplog):
    source = tmp_path / "in"
    source.mkdir()
    table = pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, 12)
    pq.write_table(table.slice(0, 6), source / "part-0.parquet")
    pq.write_table(table.slice(6), source / "part-1.parquet")
    monkeypatch.setenv("AUGMENT_RAY_PROGRESS_SECONDS", "0.5")
    job = parse_job({
        "input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
        "engines": {"m": {"batch_size": 1, "replicas": 1, "num_cpus": 1, "threads": 1,
                          "sampling": {"max_tokens": 12}}},
        "steps": [{"kind": "refine", "engine": "m"}, {"kind": "dedup_exact"}],
    })
    with caplog.at_level(logging.INFO, logger="augment_ray.progress"):
        summary = run_job(job)
    lines = [r.getMessage() for r in caplog.records if r.name == "augment_ray.progress"]
    assert lines, "no progress was logged"
    # the last line: every step saw all 12 input rows; refine's rate is the run's rate
    assert re.fullmatch(r"progress: input 12/12 \(100%\) \| refine 12/12 \(100%\) "
                        r"[\d.]+ tok/s \| dedup_exact 12/12 \(100%\)", lines[-1]), lines[-1]
    # while refine ran, lines showed it part-way with an ETA
    assert any(re.search(r"refine \d+/12 \(\d+%\) [\d.]+ tok/s ETA \d+", line)
               for line in lines[:-1]), lines
    assert summary["rows_in"] == 12
    # when rows came out of each step: dedup_exact is a barrier, so it starts after refine ends
    steps = {step["name"]: step for step in summary["steps"]}
    refine, dedup = steps["refine"], steps["dedup_exact"]
    assert 0 < refine["first_rows_at_s"] <= refine["last_rows_at_s"] < summary["wall_seconds"]
    assert dedup["first_rows_at_s"] >= refine["last_rows_at_s"]
