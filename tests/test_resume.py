"""Reliability on a real local Ray with the bundled model: a run SIGKILLed mid-way and rerun
gives exactly the output of an uninterrupted run, replaying the answers it journaled; engine
actors that die are restarted (bounded); too many rejects or unbalanced accounting fail a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.job import parse_job
from augment_ray.errors import RunFailedError
from augment_ray.io.journal import GenerationJournal, request_keys
from augment_ray.io.write import WriteStats
from augment_ray.pipeline import check_accounting, run_job
from augment_ray.storage import location

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
CLI = [sys.executable, "-m", "augment_ray.cli"]


def write_shards(folder: Path, rows: int, shards: int) -> None:
    table = pq.read_table(SAMPLE).slice(0, rows)
    folder.mkdir(parents=True)
    per = -(-rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * per, per), folder / f"part-{k}.parquet")


def refine_job(input_uri: Path, output_uri: Path, batch_size: int = 2, **reliability) -> dict:
    return {
        "name": "resume-test",
        "input": {"uri": str(input_uri)},
        "output": {"uri": str(output_uri)},
        "reliability": reliability,
        "engines": {"m": {"batch_size": batch_size, "replicas": 1, "num_cpus": 1, "threads": 1,
                          "sampling": {"max_tokens": 12}}},
        # 12-token rewrites fail the checks (tests/test_checks_job.py tests those)
        "steps": [{"kind": "refine", "engine": "m", "checks": False}, {"kind": "dedup_exact"}],
    }


def read_rows(folder: Path) -> dict[str, dict]:
    files = sorted(folder.glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
    return {row["id"]: row for row in rows}


def comparable(row: dict) -> dict:
    # everything but what differs between any two runs: timings are not in rows, so only the
    # per-attempt bookkeeping would; the refine answers and lineage must be equal
    return {k: v for k, v in row.items() if k != "refine_attempts"}


def journaled_answers(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("[!.]*.parquet"))


def run_cli(job_file: Path, *flags: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.Popen([*CLI, "run", str(job_file), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kwargs)


def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_output(tmp_path):
    source = tmp_path / "in"
    write_shards(source, rows=40, shards=4)
    jobs = {}
    for name in ("whole", "killed"):
        jobs[name] = tmp_path / f"{name}.yaml"
        jobs[name].write_text(yaml.safe_dump(refine_job(source, tmp_path / name)))

    started = time.perf_counter()
    whole = run_cli(jobs["whole"])
    whole_out, _ = whole.communicate(timeout=900)
    whole_seconds = time.perf_counter() - started
    assert whole.returncode == 0, whole_out[-3000:]

    # kill the driver and the Ray it started (one process group) once answers are journaled;
    # then kill the resumed attempt too, this time under --overwrite: both modes resume
    journal = tmp_path / "killed" / "_work" / "refine"
    for flags, answers in (((), 12), (("--overwrite",), 24)):
        killed = run_cli(jobs["killed"], *flags)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and journaled_answers(journal) < answers:
            assert killed.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)
        killed_out, _ = killed.communicate(timeout=60)
        assert not (tmp_path / "killed" / "_SUCCESS").exists()
        if flags:
            assert "resuming it" in killed_out
    journaled = journaled_answers(journal)
    assert 24 <= journaled < 40

    started = time.perf_counter()
    rerun = run_cli(jobs["killed"])
    rerun_out, _ = rerun.communicate(timeout=900)
    rerun_seconds = time.perf_counter() - started
    assert rerun.returncode == 0, rerun_out[-3000:]
    assert "resuming it" in rerun_out

    summary = json.loads((tmp_path / "killed" / "_summary.json").read_text())
    counts = summary["journal"]["refine"]
    # everything journaled when the attempt was killed is replayed; Ray's workers have process
    # groups of their own, so an engine call running at the kill may still journal its answers
    # before its worker notices its raylet is gone (those are replayed too)
    assert journaled <= counts["replayed"] < 40
    assert counts["replayed"] + counts["generated"] == 40
    # the rerun asked the model only what the killed attempt had not answered
    assert summary["steps"][1]["completion_tokens"] > 0
    for folder in ("data", "_rejects"):
        a, b = read_rows(tmp_path / "whole" / folder), read_rows(tmp_path / "killed" / folder)
        assert sorted(a) == sorted(b), folder
        for row_id, row in a.items():
            assert comparable(row) == comparable(b[row_id]), row_id
    assert len(read_rows(tmp_path / "killed" / "data")) + \
        len(read_rows(tmp_path / "killed" / "_rejects")) == 40
    assert not (tmp_path / "killed" / "_work").exists()
    assert not (tmp_path / "killed" / "_staging").exists()
    print(json.dumps({"uninterrupted_s": round(whole_seconds, 1),
                      "rerun_s": round(rerun_seconds, 1), "replayed": counts["replayed"],
                      "generated": counts["generated"]}))


def engine_actor_pids() -> list[int]:
    """Processes of this test's Ray (children of this process) running the refine actor: Ray
    titles a worker by the actor it runs."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "LLMTaskRunner" in title and "IDLE" not in title:
            pids.append(child.pid)
    return pids


def kill_engine_actors(stop: threading.Event, times: int, killed: list[int],
                       after_journal: Path | None = None) -> None:
    """Kill the engine actor's process (SIGKILL) `times` times, each incarnation once."""
    while not stop.is_set() and len(killed) < times:
        ready = after_journal is None or any(after_journal.glob("*.parquet"))
        for pid in engine_actor_pids() if ready else []:
            if pid not in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
        time.sleep(0.3)


def test_an_engine_actor_killed_mid_run_is_restarted_and_nothing_is_lost(local_ray, tmp_path):
    source = tmp_path / "in"
    write_shards(source, rows=24, shards=4)
    job = parse_job(refine_job(source, tmp_path / "out", batch_size=1))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_engine_actors,
                              args=(stop, 1, killed, tmp_path / "out" / "_work" / "refine"))
    killer.start()
    try:
        summary = run_job(job)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert summary["rows_in"] == 24
    assert summary["rows_out"] + summary["rows_rejected"] == 24
    kept = read_rows(tmp_path / "out" / "data")
    assert all(row["refined_instruction"] for row in kept.values())
    assert summary["accounting"]["input_rows_read"] == 24


def test_an_engine_actor_that_keeps_dying_fails_the_run_clearly(local_ray, tmp_path):
    source = tmp_path / "in"
    write_shards(source, rows=8, shards=1)
    job = parse_job(refine_job(source, tmp_path / "out", max_actor_restarts=1))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_engine_actors, args=(stop, 10, killed))
    killer.start()
    try:
        with pytest.raises(RunFailedError) as error:
            run_job(job)
    finally:
        stop.set()
        killer.join()
    message = str(error.value)
    assert "restarted 1 times (reliability.max_actor_restarts)" in message
    assert "not committed" in message
    assert len(killed) >= 2  # the first incarnation and its one restart
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_a_step_rejecting_too_many_rows_fails_the_run(local_ray, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"instruction": f"Write {'a long ' * 20}text number {i}."} for i in range(7)]
    rows += [{"instruction": f"Say hi {i}."} for i in range(3)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "input": {"uri": str(source)},
        "output": {"uri": str(tmp_path / "out")},
        "steps": [{"kind": "filter", "name": "short", "max_chars": 40,
                   "max_reject_share": 0.5}],
    }
    with pytest.raises(RunFailedError) as error:
        run_job(parse_job(job))
    message = str(error.value)
    assert "Step 'short' rejected 7 of its 10 rows (70.0%, more than max_reject_share 0.5)" \
        in message
    assert "max_reject_share" in message and "not committed" in message
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    # the same run with the share allowed: committed, and the accounting is in the summary
    job["steps"][0]["max_reject_share"] = 0.8
    job["output"]["mode"] = "overwrite"
    summary = run_job(parse_job(job))
    assert summary["rows_out"] == 3 and summary["rows_rejected"] == 7
    assert summary["accounting"] == {
        "input_files_read": 1, "input_rows_read": 10, "input_rows_written": 10,
        "rows_created": 0, "rows_written": 10, "duplicate_ids": 0,
    }
    step = summary["steps"][1]
    assert step["rows_in"] == step["rows_out"] + sum(step["rejected"].values()) == 10
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "_STARTED", "_SUCCESS", "_manifest.json", "_rejects", "_summary.json", "data"]


def test_accounting_refuses_lost_and_duplicated_rows(tmp_path):
    staging = location(str(tmp_path), None)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "b"]}), tmp_path / "data" / "p.parquet")
    stats = WriteStats(files=["data/p.parquet"], rows_out=3)
    stats.origin.update({"input": 3})
    with pytest.raises(RunFailedError) as error:
        check_accounting(staging, stats, rows_read=4, files_read=2, files=2)
    message = str(error.value)
    assert "4 input rows were read but 3 reached the output or the rejects" in message
    assert "1 row ids appear more than once" in message


class CountingEngine:
    """A stand-in engine for the journal's unit test: answers with the prompt, counts calls."""

    model_name = "counting"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def generate(self, prompts, sampling):
        from augment_ray.engines.base import Completion

        self.asked += [p[0]["content"] for p in prompts]
        return [Completion(f"answer to {p[0]['content']}", 3, 2, "stop") for p in prompts]


def test_journal_replays_answers_of_an_earlier_attempt(local_ray, tmp_path):
    from augment_ray.config.base import SamplingParams

    work = location(str(tmp_path / "_work"), None)
    sampling = SamplingParams(max_tokens=4)
    prompts = [[{"role": "user", "content": text}] for text in ("a", "b", "a")]
    keys = request_keys(prompts, sampling)
    assert keys[0] != keys[2]  # a second copy of a prompt is its own request
    assert keys == request_keys(prompts, sampling)
    assert keys[0] not in request_keys(prompts[:1], SamplingParams(max_tokens=5))

    first, engine = GenerationJournal.open(work, "refine", "run1"), CountingEngine()
    first.generate(engine.generate, prompts[:2], sampling)
    assert engine.asked == ["a", "b"]

    second, engine = GenerationJournal.open(work, "refine", "run2"), CountingEngine()
    assert second.earlier_count == 2
    answers = second.generate(engine.generate, prompts, sampling)
    assert engine.asked == ["a"]  # only the second copy of "a" is new
    assert [a.text for a in answers] == ["answer to a", "answer to b", "answer to a"]
    assert len(list((tmp_path / "_work" / "refine").glob("run2-*.parquet"))) == 1


class RaisingEngine:
    """A stand-in engine whose every call raises, as a buggy backend would."""

    model_name = "raising"

    def generate(self, prompts, sampling):
        raise ValueError("tokenizer exploded")


def test_an_engine_call_that_raises_rejects_its_rows_instead_of_failing_the_batch():
    from augment_ray.config.base import SamplingParams
    from augment_ray.engines.base import GenerationFailure
    from augment_ray.steps.engine_pool import GuardedEngine

    prompts = [[{"role": "user", "content": text}] for text in ("a", "b")]
    results = GuardedEngine(RaisingEngine(), None).generate(prompts, SamplingParams())
    assert results == [GenerationFailure("engine_error", "ValueError: tokenizer exploded")] * 2


def test_a_task_that_raises_rejects_the_row_with_the_error():
    from augment_ray.steps.generation import prompt_rows

    class BrokenTask:
        def prompts(self, row):
            if row["instruction"] == "bad":
                raise KeyError("input")
            return [[{"role": "user", "content": row["instruction"]}]]

    generations, unpromptable = prompt_rows(BrokenTask(), {0: {"instruction": "ok"},
                                                           1: {"instruction": "bad"}})
    assert [g.row for g in generations] == [0]
    assert unpromptable == {1: ("prompt_error", "KeyError: 'input'")}
