"""Steps that name one engine one after another share its pool: one model copy per replica.

The plan is checked on built steps; the real thing runs a refine -> respond -> score job through
the CLI on local Ray with the bundled model, shared and with `share: false`, and SIGKILLs a
shared run to show every step's journal replays on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.job import parse_job
from augment_ray.kinds import build_steps
from augment_ray.steps.shared_engine import SharedEngineStage, plan_stages

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
CLI = [sys.executable, "-m", "augment_ray.cli"]
# 0.3 CPU: three pools of one actor each (share: false) must fit beside the reads on 2 CPUs
ENGINE = {"kind": "transformers", "model": "bundled", "replicas": 1, "num_cpus": 0.3,
          "threads": 1, "batch_size": 4, "sampling": {"max_tokens": 8}}
REFINE = {"kind": "refine", "engine": "m", "checks": False}
RESPOND = {"kind": "respond", "engine": "m", "checks": False, "reject_truncated": False}
SCORE = {"kind": "score", "engine": "m", "methods": ["p_yes"], "max_reject_share": 1.0}


def job_spec(steps: list[dict], engines: dict | None = None, **fields) -> dict:
    return {"name": "shared-engine-test", "input": {"uri": "in"}, "output": {"uri": "out"},
            "engines": engines or {"m": ENGINE}, "steps": steps, **fields}


def stage_names(steps: list[dict], engines: dict | None = None) -> list[str]:
    stages = plan_stages(build_steps(parse_job(job_spec(steps, engines))))
    return [stage.name for stage in stages]


def test_consecutive_steps_on_one_engine_share_a_pool():
    assert stage_names([REFINE, RESPOND, SCORE]) == ["refine+respond+score"]
    stages = plan_stages(build_steps(parse_job(job_spec([REFINE, RESPOND, SCORE]))))
    assert isinstance(stages[0], SharedEngineStage)
    assert [s.describe()["pool_shared_by"] for s in stages[0].steps] == \
        [["refine", "respond", "score"]] * 3


def test_another_step_an_engine_or_share_false_ends_the_shared_run():
    assert stage_names([REFINE, {"kind": "dedup_exact"}, RESPOND, SCORE]) == \
        ["refine", "dedup_exact", "respond+score"]
    two = {"m": ENGINE, "n": ENGINE}
    assert stage_names([REFINE, {**RESPOND, "engine": "n"}], two) == ["refine", "respond"]
    assert stage_names([REFINE, RESPOND], {"m": {**ENGINE, "share": False}}) == \
        ["refine", "respond"]
    # auto_correct measures its threshold over the whole dataset first: never shares
    correct = {"kind": "auto_correct", "engine": "m", "confidence_column": "score_confidence",
               "threshold": 0.5}
    assert stage_names([SCORE, correct]) == ["score", "auto_correct"]


def test_share_is_not_part_of_the_job_digest():
    from augment_ray.io.committed import spec_digest

    shared = parse_job(job_spec([REFINE, RESPOND]))
    separate = parse_job(job_spec([REFINE, RESPOND], {"m": {**ENGINE, "share": False}}))
    assert spec_digest(shared) == spec_digest(separate)


def write_input(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    table = pq.read_table(SAMPLE).slice(0, rows)
    half = rows // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")


def read_rows(folder: Path) -> dict[str, dict]:
    files = sorted(folder.glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
    return {row["id"]: {k: v for k, v in row.items() if not k.endswith("_attempts")}
            for row in rows}


def run_cli(job_file: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", str(job_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)


def finished(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    return out


def journaled(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("[!.]*.parquet"))


@pytest.mark.integration
def test_refine_respond_score_on_one_engine_load_the_model_once(tmp_path):
    rows = 24
    write_input(tmp_path / "in", rows)
    jobs = {}
    for name, engine in (("shared", ENGINE), ("separate", {**ENGINE, "share": False}),
                         ("killed", ENGINE)):
        spec = job_spec([REFINE, RESPOND, SCORE], {"m": engine}, name=f"shared-{name}",
                        input={"uri": str(tmp_path / "in")},
                        output={"uri": str(tmp_path / name)})
        jobs[name] = tmp_path / f"{name}.yaml"
        jobs[name].write_text(yaml.safe_dump(spec))

    timings, summaries = {}, {}
    for name in ("shared", "separate"):
        started = time.perf_counter()
        out = finished(run_cli(jobs[name]))
        timings[name] = round(time.perf_counter() - started, 1)
        summaries[name] = json.loads((tmp_path / name / "_summary.json").read_text())
        assert f"{rows} rows in" in out
    assert summaries["shared"]["model_loads"] == {"m": 1}
    assert summaries["separate"]["model_loads"] == {"m": 3}
    shared_steps = {s["name"]: s for s in summaries["shared"]["steps"]}
    assert shared_steps["respond"]["pool_shared_by"] == ["refine", "respond", "score"]
    assert "pool_shared_by" not in summaries["separate"]["steps"][1]
    # each step journals on its own, in one pool as in three
    for summary in summaries.values():
        assert {pool: c["generated"] for pool, c in summary["journal"].items()} == \
            {"refine": rows, "respond": rows, "score": rows}
    for folder in ("data", "_rejects"):
        assert read_rows(tmp_path / "shared" / folder) == \
            read_rows(tmp_path / "separate" / folder), folder

    # a shared run SIGKILLed once the respond step has journaled answers resumes every step
    # from its own journal
    killed = run_cli(jobs["killed"])
    respond_journal = tmp_path / "killed" / "_work" / "respond"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and journaled(respond_journal) < 4:
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    at_kill = journaled(tmp_path / "killed" / "_work" / "refine")
    out = finished(run_cli(jobs["killed"]))
    assert "resuming it" in out
    summary = json.loads((tmp_path / "killed" / "_summary.json").read_text())
    assert summary["model_loads"] == {"m": 1}
    counts = summary["journal"]
    assert at_kill <= counts["refine"]["replayed"] <= rows
    assert counts["respond"]["replayed"] >= 4
    for pool in ("refine", "respond", "score"):
        assert counts[pool]["replayed"] + counts[pool]["generated"] == rows, pool
    for folder in ("data", "_rejects"):
        assert read_rows(tmp_path / "killed" / folder) == \
            read_rows(tmp_path / "shared" / folder), folder
    print(json.dumps({"wall_s": timings, "journal_after_kill": counts}))
