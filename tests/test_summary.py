"""The run summary with diversity figures: what `summary.format_summary` prints per step, and
the job's `report` block that sizes (or turns off) the diversity pass."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from augment_ray.config.job import parse_job
from augment_ray.errors import JobSpecError
from augment_ray.io.committed import spec_digest
from augment_ray.io.write import WriteStats
from augment_ray.summary import build_summary, format_summary

# the step line as tests/test_example_jobs.py reads it
STEP = re.compile(r"^  (\w+)\s+in\s+(\d+)  out\s+(\d+)(?:  created (\d+))?(.*)$")


def summary_of(steps: list[dict]) -> dict:
    stats = WriteStats(files=["data/part-00000-0000.parquet"], rows_out=9, rows_rejected=1,
                       origin=Counter({"input": 4, "expand": 6}),
                       rejected=Counter({("expand", "not_new"): 1}),
                       sums=Counter({"refine_prompt_tokens": 40, "refine_completion_tokens": 20,
                                     "expand_prompt_tokens": 50,
                                     "expand_completion_tokens": 60}))
    return build_summary(job_name="j", run_id="r1", input_uri="in", output_uri="out",
                         input_files=1, steps=steps, stats=stats, wall_seconds=2.0,
                         started_at="2026-12-01T00:00:00+00:00")


REFINE = {"name": "refine", "kind": "refine", "rewrites_instruction": "refined_instruction",
          "diversity": {"input": "instruction", "output": "refined_instruction",
                        "new_rows": False,
                        "inputs": {"n": 4, "mean_cosine_distance": 0.8123, "vendi": 3.46},
                        "outputs": {"n": 4, "mean_cosine_distance": 0.7, "vendi": 2.94},
                        "embedder": "all-MiniLM-L6-v2"}}
EXPAND = {"name": "expand", "kind": "expand", "note": "6 new rows from 4 seeds",
          "diversity": {"input": "instruction", "output": "instruction", "new_rows": True,
                        "inputs": {"n": 4, "mean_cosine_distance": 0.7, "vendi": 2.94},
                        "outputs": {"n": 4, "mean_cosine_distance": 0.75, "vendi": 3.05}},
          "checks": {"not_new": 0.9}, "checks_passed": {"not_new": 0.8333}}


def lines_of(summary: dict) -> dict[str, str]:
    return {found[1]: found[0] for line in format_summary(summary).splitlines()
            if (found := STEP.match(line))}


def test_each_generating_step_line_says_its_vendi_before_and_after() -> None:
    lines = lines_of(summary_of([REFINE, EXPAND]))
    assert lines["refine"] == ("  refine           in        4  out        4  tokens 40 prompt / "
                               "20 gen  diversity vendi 3.5 -> 2.9")
    # the step's own note still ends its line
    assert lines["expand"].endswith("  tokens 50 prompt / 60 gen  diversity vendi 2.9 -> 3.0"
                                    "  6 new rows from 4 seeds")
    assert "diversity" not in lines["input"]


@pytest.mark.parametrize("figures", [
    {"input": "instruction", "output": "refined_instruction", "new_rows": False},  # not measured
    {"input": "instruction", "output": "o", "new_rows": False,
     "inputs": {"n": 0, "mean_cosine_distance": None, "vendi": None},
     "outputs": {"n": 3, "mean_cosine_distance": 0.5, "vendi": 2.0}},  # nothing on one side
    {"input": "instruction", "output": "o", "new_rows": False,
     "inputs": {"n": 1, "mean_cosine_distance": None, "vendi": 1.0},
     "outputs": {"n": 1, "mean_cosine_distance": None, "vendi": 1.0}},  # one text says nothing
])
def test_no_figures_no_addition(figures: dict) -> None:
    line = lines_of(summary_of([{**REFINE, "diversity": figures}]))["refine"]
    assert line.endswith("tokens 40 prompt / 20 gen")


def test_a_summary_of_before_diversity_prints_as_before() -> None:
    steps = [{k: v for k, v in REFINE.items() if k != "diversity"}]
    assert "diversity" not in format_summary(summary_of(steps))


def job(tmp_path: Path, **extra) -> dict:
    return {"input": {"uri": str(tmp_path)}, "output": {"uri": str(tmp_path / "out")}, **extra}


def test_the_report_block(tmp_path: Path) -> None:
    assert parse_job(job(tmp_path)).report.diversity_sample == 256
    assert parse_job(job(tmp_path, report={"diversity_sample": 0})).report.diversity_sample == 0
    with pytest.raises(JobSpecError, match="diversity_sample"):
        parse_job(job(tmp_path, report={"diversity_sample": -1}))
    with pytest.raises(JobSpecError, match="diversity_samples"):
        parse_job(job(tmp_path, report={"diversity_samples": 10}))


def test_the_report_block_is_not_part_of_the_job_digest(tmp_path: Path) -> None:
    """Measuring differently is the same job: a committed date stays done, an unfinished attempt
    resumes, and every job's digest is what it was before the block existed."""
    plain = parse_job(job(tmp_path))
    other = parse_job(job(tmp_path, report={"diversity_sample": 32}))
    assert spec_digest(plain) == spec_digest(other)
    assert "report" not in plain.model_dump()
