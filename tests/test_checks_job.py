"""The generating steps' checks with the real bundled model and the real embedder, on a real local
Ray: what fails a check is rejected with its reason and measured value, what passes would pass
again, and the CLI's summary lists each check's rejections."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.engines.embedding_engine import EmbeddingEngineSpec
from augment_ray.tasks.base import load_template
from augment_ray.validate.checks import (
    Candidate,
    NewInstructionChecks,
    ResponseChecks,
    RewriteChecks,
)
from augment_ray.validate.embedder import process_embedder

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
CLI = [sys.executable, "-m", "augment_ray.cli"]
# what each reason's reject_detail starts with: the measured value and the bound it broke
DETAIL = {
    "template_echo": r"^(scaffolding|prompt wording) ",
    "not_a_request": r"^(opens like an answer|neither a question nor an instruction|"
                     r"a clause, then no request|no words)",
    "unfaithful": r"^cosine -?\d\.\d{3} < min_similarity 0\.5: ",
    "not_longer": r"^(length ratio \d+\.\d\d < min_length_ratio 1\.0|unchanged): ",
    "off_task": r"^cosine to seed -?\d\.\d{3} < min_similarity 0\.3: ",
    "not_new": r"^cosine to seed \d\.\d{3} > max_similarity 0\.85: ",
    "near_sibling": r"^cosine to a sibling \d\.\d{3} > max_sibling_similarity 0\.9: ",
    "refusal": r"^refuses: ",
    "echoes_instruction": r"^(repeats \d+% of the instruction|cosine \d\.\d{3} > max_similarity)",
    "off_topic": r"^cosine -?\d\.\d{3} < min_similarity 0\.2: ",
}


def read_folder(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def run_cli(job: dict, tmp_path: Path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    done = subprocess.run([*CLI, "run", str(path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    return done.stdout


def assert_rejected_as_measured(rejected: list[dict], step: str, reasons: set[str]) -> None:
    for row in rejected:
        if row["reject_step"] != step or row["reject_reason"] not in DETAIL:
            continue
        assert row["reject_reason"] in reasons, row
        assert re.match(DETAIL[row["reject_reason"]], row["reject_detail"]), row


def test_refine_rejects_what_fails_its_checks_and_keeps_what_passes(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    rows = pq.read_table(SAMPLE).slice(0, 8)
    pq.write_table(rows, source / "part-0.parquet")
    job = {
        "name": "checks", "input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
        "reliability": {"max_reject_share": 1.0},
        "engines": {"small": {"batch_size": 8, "threads": 2,
                              "sampling": {"temperature": 0.0, "max_tokens": 48}}},
        "steps": [{"kind": "refine", "engine": "small"}],
    }
    stdout = run_cli(job, tmp_path)
    out = tmp_path / "out"
    kept, rejected = read_folder(out / "data"), read_folder(out / "_rejects")
    assert sorted(r["id"] for r in kept + rejected) == sorted(rows["id"].to_pylist())
    by_reason: dict[str, int] = {}
    for row in rejected:
        by_reason[row["reject_reason"]] = by_reason.get(row["reject_reason"], 0) + 1
    checks = set(RewriteChecks().describe())
    # the bundled 135M model fails some checks on these rows (greedy: the same ones each run)
    assert set(by_reason) & checks, by_reason
    assert_rejected_as_measured(rejected, "refine", checks)
    for reason, count in by_reason.items():  # the summary line of each check's rejections
        assert re.search(rf"^      rejected\s+{count}  {reason}$", stdout, re.MULTILINE), stdout

    # what the step kept passes the same checks again, outside Ray
    embed = process_embedder(EmbeddingEngineSpec())
    template = load_template("refine", "v1", "en").text
    again = RewriteChecks().check([Candidate(r["instruction"], r["refined_instruction"],
                                             template=template) for r in kept], embed)
    assert again == [None] * len(kept)


def test_expand_and_respond_check_new_instructions_and_responses(tmp_path):
    from augment_ray.config.job import parse_job
    from augment_ray.pipeline import run_job

    source = tmp_path / "in"
    source.mkdir()
    rows = pq.read_table(SAMPLE).slice(8, 3)
    pq.write_table(rows, source / "part-0.parquet")
    job = parse_job({
        "input": {"uri": str(source)}, "output": {"uri": str(tmp_path / "out")},
        "reliability": {"max_reject_share": 1.0},
        "engines": {"small": {"batch_size": 8, "threads": 2, "num_cpus": 0.5,
                              "sampling": {"temperature": 0.0, "max_tokens": 32}}},
        "steps": [
            {"kind": "expand", "engine": "small", "n": 2, "sampling": {"temperature": 0.9}},
            {"kind": "respond", "engine": "small", "reject_truncated": False},
        ],
    })
    summary = run_job(job)
    out = tmp_path / "out"
    kept, rejected = read_folder(out / "data"), read_folder(out / "_rejects")
    assert len(kept) + len(rejected) == summary["rows_in"] + 3 * 2
    assert_rejected_as_measured(rejected, "expand", set(NewInstructionChecks().describe()))
    assert_rejected_as_measured(rejected, "respond", set(ResponseChecks().describe()))
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["expand"]["checks"] == NewInstructionChecks().describe()
    assert steps["respond"]["checks"] == ResponseChecks().describe()
    assert steps["expand"]["checks_embedder"] == "all-MiniLM-L6-v2"

    # the new instructions kept from one seed are neither copies of it nor of each other
    embed = process_embedder(EmbeddingEngineSpec())
    seeds = {r["id"]: r["instruction"] for r in rows.to_pylist()}
    new = [r for r in kept if r["origin_step"] == "expand"]
    again = NewInstructionChecks().check([
        Candidate(seeds[r["expand_parent_id"]], r["instruction"], group=r["expand_parent_id"],
                  template=load_template("expand", "v1", "en").text) for r in new], embed)
    assert again == [None] * len(new)
    answered = [r for r in kept if r.get("respond_completion_tokens")]
    assert ResponseChecks().check([Candidate(r["instruction"], r["output"]) for r in answered],
                                  embed) == [None] * len(answered)
