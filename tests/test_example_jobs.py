"""Every example job file under jobs/ runs through the real CLI and prints a summary that adds up.

Each `jobs/**/*.yaml` is copied into tmp_path with its output moved there, the model jobs' input
cut to a few rows of their own bundled data and every max_tokens of sampling lowered; then
`augment-ray run` (or `augment-ray loop` for a loop job) runs it as a subprocess from the
repository root, so the job's relative data paths resolve as documented. A new job file is
picked up by the glob; the model-free ones keep their whole bundled input (they take seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("**/*.yaml"))
CLI = [sys.executable, "-m", "augment_ray.cli"]
MODEL_ROWS = 6  # input rows of a model job
MAX_TOKENS = 16  # sampling.max_tokens of every engine, step, student and teacher
TIMEOUT_S = 600


def read_job(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def is_loop(job: dict[str, Any]) -> bool:
    return "seeds" in job  # what `augment-ray validate` goes by


def uses_model(job: dict[str, Any]) -> bool:
    return bool(job.get("engines"))


def job_param(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    marks = [pytest.mark.integration] if uses_model(read_job(path)) else []
    return pytest.param(path, id=rel, marks=marks)


def test_every_job_file_is_exercised():
    names = {p.relative_to(ROOT).as_posix() for p in JOB_FILES}
    assert {"jobs/refine_seed_tasks.yaml", "jobs/loops/llm2llm_gsm8k.yaml"} <= names
    for path in JOB_FILES:  # `augment-ray loop` for loop jobs, and only for them
        assert is_loop(read_job(path)) == (path.parent.name == "loops"), path


# ---- making the small copy of a job ------------------------------------------------------------


def few_rows(spec: dict[str, Any], to: Path, n: int) -> dict[str, Any]:
    """`spec` (an input section) pointed at the first n rows of its data, written under `to`."""
    source = ROOT / spec["uri"]
    if source.suffix == ".jsonl":
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        target = to.with_suffix(".jsonl")
        target.write_text("".join(line + "\n" for line in lines[:n]))
    else:
        files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
        table = pa.concat_tables([pq.read_table(f) for f in files]).slice(0, n)
        to.mkdir()
        target = to / "part-00000.parquet"
        pq.write_table(table, target)
        target = to
    return {**spec, "uri": str(target)}


def small_sampling(node: Any) -> None:
    """Lowers max_tokens in every `sampling:` of the job (engines, steps, student, teacher)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "sampling" and isinstance(value, dict) and "max_tokens" in value:
                value["max_tokens"] = min(value["max_tokens"], MAX_TOKENS)
            else:
                small_sampling(value)
    elif isinstance(node, list):
        for value in node:
            small_sampling(value)


def small_copy(path: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    job = read_job(path)
    job["output"]["uri"] = str(tmp_path / "out")
    if uses_model(job):
        for name, engine in job["engines"].items():
            engine["replicas"] = 1
            engine["sampling"] = {**(engine.get("sampling") or {}), "max_tokens": MAX_TOKENS}
            job["engines"][name] = engine
        small_sampling(job)
        if not is_loop(job):
            # 16-token answers are cut short: most fail the generating steps' checks, which
            # reject them with a reason (tested here) instead of the run failing
            job.setdefault("reliability", {})["max_reject_share"] = 1.0
        for section in ("input", "seeds", "eval"):
            if section in job:
                job[section] = few_rows(job[section], tmp_path / section, MODEL_ROWS)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(job, sort_keys=False))
    return copy, job


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}  # a private local Ray, never a cluster
    done = subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    assert "Traceback" not in done.stdout, done.stdout[-5000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    return done


def parquet_rows(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("*.parquet"))


# ---- reading the printed summary ---------------------------------------------------------------

HEADER = re.compile(r"^Run (\S+) of job '(.+)': (\d+) rows in, (\d+) out, (\d+) rejected, ")
STEP = re.compile(r"^  (\w+)\s+in\s+(\d+)  out\s+(\d+)(?:  created (\d+))?(.*)$")
REJECTED = re.compile(r"^      rejected\s+(\d+)  (\S+)$")


def printed_summary(stdout: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """(header figures, {step: {in, out, created, rest, rejected: {reason: n}}}, all lines)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if HEADER.match(line))
    match = HEADER.match(lines[start])
    header = {"run_id": match[1], "job": match[2], "rows_in": int(match[3]),
              "rows_out": int(match[4]), "rows_rejected": int(match[5])}
    steps: dict[str, dict[str, Any]] = {}
    current = None
    for line in lines[start + 1:]:
        if found := STEP.match(line):
            current = {"in": int(found[2]), "out": int(found[3]),
                       "created": int(found[4] or 0), "rest": found[5], "rejected": {}}
            assert found[1] not in steps, f"two lines for step {found[1]}"
            steps[found[1]] = current
        elif (found := REJECTED.match(line)) and current is not None:
            current["rejected"][found[2]] = int(found[1])
    return header, steps, lines[start:]


# ---- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [job_param(p) for p in JOB_FILES])
def test_example_job_runs_and_its_summary_adds_up(path: Path, tmp_path: Path):
    copy, job = small_copy(path, tmp_path)
    out = tmp_path / "out"
    if is_loop(job):
        check_loop(run_cli("loop", str(copy)).stdout, job, out)
    else:
        check_run(run_cli("run", str(copy)).stdout, job, out)
        if job["input"].get("columns", {}).get("turns"):
            check_conversations(out, tmp_path)


def check_conversations(out: Path, tmp_path: Path) -> None:
    """A multi-turn job: each kept conversation answers every question in order, its old turns
    beside it; and it exports as docs/CONVERSATIONS.md shows."""
    import datasets

    rows = pa.concat_tables([pq.read_table(f) for f in sorted((out / "data").glob("*.parquet"))]
                            ).to_pylist()
    assert rows, "the bundled model kept no conversation"
    for row in rows:
        questions = [t["content"] for t in row["respond_previous_messages"]]
        turns = row["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * len(questions)
        assert [t["content"] for t in turns[::2]] == questions
        assert turns[-1]["content"] == row["output"]
        # score, turns: each: one confidence per answer, the row's is the lowest
        answers = row["score_turn_confidences"]
        assert len(answers) == len(questions) and row["score_confidence"] == min(answers)
    target = tmp_path / "mt.jsonl"
    done = run_cli("export", str(out), "--format", "openai-messages", "--to", str(target))
    exported = datasets.load_dataset("json", data_files=str(target), split="train")
    assert f"wrote {len(exported)} examples to {target}" in done.stdout
    assert len(exported) == len(rows)
    assert sorted(map(str, exported["messages"])) == sorted(
        str(row["messages"]) for row in rows)


def check_run(stdout: str, job: dict[str, Any], out: Path) -> None:
    assert (out / "_SUCCESS").is_file()
    summary = json.loads((out / "_summary.json").read_text())
    header, printed, lines = printed_summary(stdout)
    assert header["job"] == job["name"] == summary["job"]
    assert header["run_id"] == summary["run_id"]
    for key in ("rows_in", "rows_out", "rows_rejected"):
        assert header[key] == summary[key], key

    names = ["input", *(step.get("name") or step["kind"] for step in job["steps"])]
    assert list(printed) == names  # one line per step, in job order
    assert [entry["name"] for entry in summary["steps"]] == names
    kinds = {"input": "read", **{step.get("name") or step["kind"]: step["kind"]
                                 for step in job["steps"]}}
    live = 0
    for entry in summary["steps"]:
        name = entry["name"]
        shown = printed[name]
        created = entry.get("rows_created", 0)
        rejected = sum(entry["rejected"].values())
        # the same counts printed and in _summary.json, and each step's rows add up
        assert (shown["in"], shown["out"], shown["created"], shown["rejected"]) == (
            entry["rows_in"], entry["rows_out"], created, entry["rejected"]), name
        assert entry["rows_in"] + created == entry["rows_out"] + rejected, name
        if name != "input":
            assert entry["rows_in"] == live, f"{name} gets what the step before passed on"
        live = entry["rows_out"]
        check_kind_text(kinds[name], entry, shown["rest"])

    # the run: every input row (and every created row) is in data/ or _rejects/
    created = sum(entry.get("rows_created", 0) for entry in summary["steps"])
    assert summary["rows_in"] + created == summary["rows_out"] + summary["rows_rejected"]
    assert summary["rows_out"] == live
    assert summary["rows_rejected"] == sum(summary["rejected_by_reason"].values())
    assert summary["rejected_by_reason"] == {
        f"{entry['name']}:{reason}": count
        for entry in summary["steps"] for reason, count in entry["rejected"].items()}
    assert parquet_rows(out / "data") == summary["rows_out"]
    assert parquet_rows(out / "_rejects") == summary["rows_rejected"]
    accounting = summary["accounting"]
    assert accounting["input_rows_read"] == summary["rows_in"]
    assert (f"  accounting: {accounting['input_rows_read']} input rows read from "
            f"{accounting['input_files_read']} files = {accounting['input_rows_written']} "
            f"written (+{accounting['rows_created']} created), ids unique") in lines
    assert f"  output: {summary['output']['uri']}" in lines


def check_kind_text(kind: str, entry: dict[str, Any], rest: str) -> None:
    """The kind-specific end of a step's summary line."""
    if "completion_tokens" in entry:  # model steps: the tokens they used
        assert f"  tokens {entry['prompt_tokens']} prompt / {entry['completion_tokens']} gen" \
            in rest, (kind, rest)
    else:
        assert "tokens" not in rest, (kind, rest)
    # a step's own words (Step.describe()'s `note`) end its line, and only then
    if entry.get("note"):
        assert rest.endswith(f"  {entry['note']}"), (kind, rest)
    if "threshold_from" in entry and entry.get("threshold") is not None:
        # auto_filter and auto_correct: the dataset threshold and where it came from
        assert f"  threshold {entry['threshold']:.4f} ({entry['threshold_from']}" in rest, rest
    else:  # e.g. dedup_near's and decontaminate's `threshold` setting is not a result
        assert "threshold" not in rest, (kind, rest)
    if kind in ("auto_filter", "auto_correct"):
        assert entry.get("threshold") is not None and "threshold_from" in entry, entry


LOOP_HEADER = re.compile(r"^LLM2LLM job '(.+)': (\d+) seeds, (\d+) rounds, "
                         r"final training set (\d+) rows$")
LOOP_ROUND = re.compile(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(.*)$")


def check_loop(stdout: str, job: dict[str, Any], out: Path) -> None:
    assert (out / "_SUCCESS").is_file()
    report = json.loads((out / "_report.json").read_text())
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if LOOP_HEADER.match(line))
    header = LOOP_HEADER.match(lines[start])
    assert (header[1], int(header[2]), int(header[3]), int(header[4])) == (
        job["name"], report["seed_rows"], job.get("rounds", 2), report["final_train_rows"])
    assert report["seed_rows"] + report["seed_rows_rejected"] == MODEL_ROWS
    rows = [LOOP_ROUND.match(line) for line in lines[start + 2:start + 2 + len(report["rounds"])]]
    assert all(rows), lines[start:]
    train = report["seed_rows"]  # round 0 trains on the seeds
    for shown, r in zip(rows, report["rounds"], strict=True):
        assert (int(shown[1]), int(shown[2]), int(shown[4]), int(shown[5]), int(shown[6])) == (
            r["round"], r["train_rows"], r["wrong"], r["generated"], r["accepted"])
        rejected = "-" if not r["rejected"] else ", ".join(
            f"{k} {v}" for k, v in r["rejected"].items())
        assert shown[8] == rejected
        # the round's rows add up: every wrong seed got per_wrong tries, each accepted or rejected
        assert r["train_rows"] == train
        assert r["wrong"] == r["seed_rows"] - r["seed_correct"]
        assert r["generated"] == r["accepted"] + sum(r["rejected"].values())
        assert r["generated"] == r["wrong"] * job["teacher"].get("per_wrong", 1)
        assert r["next_train_rows"] == r["train_rows"] + r["accepted"]
        if "eval" in job:
            assert r["eval_rows"] == MODEL_ROWS
        round_dir = out / f"round={r['round']:02d}"
        assert (round_dir / "_DONE").is_file()
        assert parquet_rows(round_dir / "generated") == r["accepted"]
        assert parquet_rows(round_dir / "_rejects") == sum(r["rejected"].values())
        train = r["next_train_rows"]
    assert report["final_train_rows"] == train == parquet_rows(out / "train")
