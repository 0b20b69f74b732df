"""Progress of a running job: rows per step, tokens/s, ETA, shown by the driver: redrawn in
place on a terminal, logged elsewhere; Ray Data's own progress output kept off the terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray import progress
from augment_ray.cli import next_commands
from augment_ray.config.base import SamplingParams
from augment_ray.config.job import parse_job
from augment_ray.engines.base import Completion
from augment_ray.pipeline import run_job
from augment_ray.progress import (
    RAY_PROGRESS_ENV,
    Board,
    CallProgress,
    ProgressLogger,
    StepProgress,
    quiet_ray_data,
)
from augment_ray.progress_display import LiveBlock, format_duration, progress_line, progress_rows
from augment_ray.steps.engine_pool import GuardedEngine
from augment_ray.steps.generation import GenerationRows, RunOptions
from augment_ray.steps.llm import LLMTaskRunner
from augment_ray.tasks.respond import RespondTask

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "augment_ray.cli"]


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
        # 12-token rewrites fail the checks (tests/test_checks_job.py tests those)
        "steps": [{"kind": "refine", "engine": "m", "checks": False}, {"kind": "dedup_exact"}],
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


# ---- the terminal ------------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    """A terminal as far as the progress code can tell."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: understands \\r, \\n, cursor up (ESC[1A) and erase to
    the end of the screen (ESC[J), the only controls the progress lines use."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            col = 0
        elif token == "\x1b[1A":
            row = max(row - 1, 0)
        elif token == "\x1b[J":
            lines[row] = lines[row][:col]
            del lines[row + 1:]
        else:
            assert not token.startswith("\x1b"), f"unexpected control {token!r}"
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return lines


def test_progress_rows_have_a_bar_counts_rate_and_eta_per_step():
    snapshot = {"input": StepProgress(rows=100), "refine": StepProgress(rows=25, tokens=500)}
    rows = progress_rows(["input", "refine", "dedup_exact"], snapshot, total=100, elapsed=50,
                         unicode=False)
    assert rows == [
        "input        ######################## 100/100 100%  done",
        "refine       ######------------------  25/100  25%  10.0 tok/s  ETA 2m30s",
        "dedup_exact  ------------------------   0/100   0%  [50s]",
    ]
    # provisional counts never show more rows than the input has; unknown totals: counts only
    assert progress_rows(["refine"], {"refine": StepProgress(rows=130)}, 128, 10)[0] \
        .startswith("refine  " + "\u2588" * 24 + " 128/128 100%  done")
    assert progress_rows(["input"], {"input": StepProgress(rows=7)}, None, 3) == \
        ["input  7 rows  [3s]"]


def test_live_block_redraws_in_place_and_prints_other_output_above_it():
    stream = FakeTTY()
    block = LiveBlock(stream)
    block.update(["input 0/4", "refine 0/4"])
    block.update(["input 4/4", "refine 1/4"])
    assert screen(stream.getvalue()) == ["input 4/4", "refine 1/4"]
    block.write_above("a log line\n")
    block.write_above("print() writes its text")  # ... and its newline separately
    assert screen(stream.getvalue()) == ["a log line", "print() writes its text"]
    block.write_above("\n")
    block.write_above("a bar without newline")
    block.update(["input 4/4", "refine 3/4"])  # the bar's line is kept, the block below it
    block.update(["input 4/4", "refine 4/4"])
    block.close()
    assert screen(stream.getvalue()) == [
        "a log line", "print() writes its text", "a bar without newline",
        "input 4/4", "refine 4/4", "",
    ]


def test_live_block_cuts_lines_to_the_terminal_width(monkeypatch):
    monkeypatch.setattr(LiveBlock, "width", lambda self: 30)
    stream = FakeTTY()
    block = LiveBlock(stream)
    block.update(["x" * 50, "short"])
    assert screen(stream.getvalue()) == ["x" * 29, "short"]  # a wrapped line breaks cursor-up


def test_live_block_routes_stderr_prints_and_log_handlers_above_it(monkeypatch):
    terminal = FakeTTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = logging.getLogger("augment_ray.test_live_block")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        with LiveBlock(sys.stderr, redirect=True) as block:
            block.update(["refine 1/2"])
            print("from a worker", file=sys.stderr)
            logger.warning("from a logger")
            block.update(["refine 2/2"])
        assert sys.stderr is terminal and handler.stream is terminal  # put back
    finally:
        logger.removeHandler(handler)
    assert screen(terminal.getvalue()) == ["from a worker", "from a logger", "refine 2/2", ""]


class FakeRemote:
    def __init__(self, value):
        self.value = value

    def remote(self):
        return self.value() if callable(self.value) else self.value


class FakeBoard:
    """A ProgressBoard without Ray: `live` is what running calls report, `exact` the counts."""

    def __init__(self, exact, live):
        self.snapshot = FakeRemote(exact)
        self.live = FakeRemote(live)


def test_progress_logger_redraws_on_a_terminal_and_ends_with_the_exact_counts(monkeypatch):
    monkeypatch.delenv(RAY_PROGRESS_ENV, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    stream = FakeTTY()
    board = FakeBoard({"input": StepProgress(rows=4), "refine": StepProgress(rows=4, tokens=80)},
                      {"input": StepProgress(rows=4), "refine": StepProgress(rows=2, tokens=40)})
    with ProgressLogger(board, ["input", "refine"], 4, stream=stream, interval=0.05) as logger:
        deadline = time.time() + 10
        while "2/4" not in stream.getvalue() and time.time() < deadline:
            time.sleep(0.05)
    assert logger.live
    raw = stream.getvalue()
    assert re.search(r"refine  \S{24} 2/4  50%  [\d.]+ tok/s  ETA \d+s", raw), raw
    final = screen(raw)
    assert final[0] == "input   " + "\u2588" * 24 + " 4/4 100%  done"
    assert re.fullmatch("refine  " + "\u2588" * 24 + r" 4/4 100%  [\d.]+ tok/s  done  \[\d+s\]",
                        final[1]), final
    assert final[2:] == [""]


def test_progress_logger_logs_lines_when_not_a_terminal(caplog):
    board = FakeBoard({"refine": StepProgress(rows=4)}, {"refine": StepProgress(rows=0)})
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="augment_ray.progress"), \
            ProgressLogger(board, ["refine"], 4, stream=stream, interval=0.05) as logger:
        time.sleep(0.3)
    assert not logger.live and stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "augment_ray.progress"]
    # a line only when it changed; the last one has the exact counts
    assert lines == ["progress: refine 0/4 (0%)", "progress: refine 4/4 (100%)"]


def test_ray_data_progress_wanted_means_plain_lines(monkeypatch):
    monkeypatch.setenv(RAY_PROGRESS_ENV, "1")
    board = FakeBoard({}, {})
    with ProgressLogger(board, ["refine"], 4, stream=FakeTTY(), interval=0.05) as logger:
        pass
    assert not logger.live  # Ray Data's own bars would draw over ours


# ---- counting while engine calls run -----------------------------------------------------------

def test_board_counts_running_calls_once_whichever_report_comes_first():
    board = Board()
    board.add("input", 8, 0)
    board.call_running("refine", "a", 2, 30)  # call a (4 rows): half its prompts answered
    board.call_running("refine", "b", 1, 10)
    assert (board.live()["refine"].rows, board.live()["refine"].tokens) == (3, 40)
    assert "refine" not in board.snapshot()
    board.call_finished("refine", "a", 4, 70)  # a returned; the count after the step is due
    assert board.live()["refine"].rows == 5
    board.add("refine", 4, 70)  # ... and here it is: a's rows count once
    assert (board.live()["refine"].rows, board.live()["refine"].tokens) == (5, 80)
    board.add("refine", 4, 50)  # b's rows counted after the step before b's finish arrived
    assert (board.live()["refine"].rows, board.live()["refine"].tokens) == (8, 120)
    board.call_finished("refine", "b", 4, 50)
    board.call_running("refine", "c", 3, 5)
    board.call_dropped("refine", "c")  # a call that raised (its batch is retried)
    assert (board.live()["refine"].rows, board.live()["refine"].tokens) == (8, 120)
    assert board.snapshot()["refine"].rows == 8 and board.live()["input"].rows == 8


class RecordingBoard:
    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        board = self

        class Method:
            def remote(self, *args):
                board.calls.append((method, *args))

        return Method()


def test_call_progress_reports_the_share_of_rows_done_and_never_raises():
    board = RecordingBoard()
    progress = CallProgress(board, "expand", rows=10, prompts=20)  # two prompts per row
    progress(5, 40)
    progress(5, 40)
    progress(30, 10)  # retries: more prompts than the call had
    progress.finished(123)
    key = progress.key
    assert board.calls == [
        ("call_running", "expand", key, 2, 40), ("call_running", "expand", key, 5, 80),
        ("call_running", "expand", key, 10, 90), ("call_finished", "expand", key, 10, 123),
    ]

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("the board is gone")

    broken = CallProgress(Broken(), "s", 1, 1)
    broken(1, 1)
    broken.finished(1)
    broken.dropped()


PROMPT = [{"role": "user", "content": "q"}]


class BatchedEngine:
    model_name = "batched"
    reports_progress = True

    def generate(self, prompts, sampling, progress=None):
        for start in range(0, len(prompts), 2):
            progress(len(prompts[start:start + 2]), 3)
        return [Completion("x", 1, 3, "stop") for _ in prompts]


class WholeEngine:
    model_name = "whole"

    def generate(self, prompts, sampling):  # no progress parameter at all
        return [Completion("x", 1, 3, "stop") for _ in prompts]


class RaisingEngine(WholeEngine):
    def generate(self, prompts, sampling):
        raise RuntimeError("boom")


def test_guarded_engine_reports_each_sub_batch_or_else_once_per_call():
    for engine, expected in [(BatchedEngine(), [(2, 3), (2, 3), (1, 3)]),
                             (WholeEngine(), [(5, 15)]), (RaisingEngine(), [(5, 0)])]:
        seen = []
        results = GuardedEngine(engine, None).generate(
            [PROMPT] * 5, SamplingParams(), progress=lambda n, t, seen=seen: seen.append((n, t)))
        assert len(results) == 5 and seen == expected, engine
    assert len(GuardedEngine(WholeEngine(), None).generate([PROMPT], SamplingParams())) == 1


def test_llm_runner_tells_the_board_as_the_call_runs_and_when_it_returns():
    runner = object.__new__(LLMTaskRunner)  # no model: a scripted engine
    task = RespondTask("instruction", "s_previous_output")
    runner.step, runner.task, runner.options = "s", task, RunOptions()
    runner.engine = GuardedEngine(BatchedEngine(), None)
    runner.out = GenerationRows("s", "e", "batched", task, SamplingParams())
    runner.progress_board = RecordingBoard()
    table = pa.table({
        "id": ["a", "b", "c", "d"], "instruction": ["q1", "q2", "q3", None],
        "input": pa.nulls(4, pa.string()), "output": pa.nulls(4, pa.string()),
        "source_id": ["a", "b", "c", "d"], "origin_step": ["input"] * 4,
        "reject_step": [None, None, None, "input"],
        "reject_reason": [None, None, None, "missing_instruction"],
        "reject_detail": pa.nulls(4, pa.string()),
    })
    assert len(runner(table)) == 4
    calls = runner.progress_board.calls
    # 3 prompts in sub-batches of 2 and 1; the rejected row passes the step too: 4 rows
    assert [call[0] for call in calls] == ["call_running", "call_running", "call_finished"]
    assert [call[3:] for call in calls] == [(2, 3), (4, 6), (4, 9)]


# ---- Ray Data's own progress output; the end of a run -----------------------------------------

def test_ray_data_progress_bars_and_info_logs_stay_off_the_terminal(monkeypatch, request):
    import ray.data

    monkeypatch.delenv(RAY_PROGRESS_ENV, raising=False)
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = True
    request.addfinalizer(lambda: (setattr(context, "enable_progress_bars", before[0]),
                                  setattr(context, "print_on_execution_start", before[1])))
    quiet_ray_data()
    assert not context.enable_progress_bars and not context.print_on_execution_start
    console = [h for h in logging.getLogger("ray.data").handlers
               if type(h).__name__ == "PlainRayHandler"]
    assert console
    others = [h for h in [*logging.getLogger("ray.data").handlers, *logging.getLogger().handlers]
              if h not in console]
    assert all(f is not progress._ray_data_console_noise for h in others for f in h.filters)

    def shown(level, message):
        record = logging.LogRecord("ray.data.dataset", level, __file__, 1, message, (), None)
        return all(f(record) if callable(f) else f.filter(record) for f in console[0].filters)

    assert not shown(logging.INFO, "Data sink RoutingParquet finished. 24 rows written.")
    assert not shown(logging.WARNING, "Progress bars disabled. To enable, set ...")
    assert shown(logging.WARNING, "a real warning")

    monkeypatch.setenv(RAY_PROGRESS_ENV, "1")  # what `augment-ray run --debug` sets
    context.enable_progress_bars = True
    quiet_ray_data()
    assert context.enable_progress_bars


def test_next_commands_name_the_run_output_and_real_arguments():
    # the summary entries as a run writes them (Step.describe: refine names its column)
    summary = {"job": "demo", "output": {"uri": "out/demo"}, "steps": [
        {"name": "input", "kind": "read"},
        {"name": "refine", "kind": "refine", "rewrites_instruction": "refined_instruction"}]}
    assert next_commands(summary).splitlines() == [
        "Next:",
        "  augment-ray summary out/demo    # this summary again",
        "  augment-ray report out/demo     # writes out/demo/_report/report.html",
        "  augment-ray export out/demo --format alpaca --to out/demo.alpaca.jsonl "
        "--instruction-column refined_instruction",
    ]
    plain = {**summary, "output": {"uri": "s3://bucket/runs/a b"}, "steps": []}
    assert next_commands(plain).splitlines()[3] == (
        "  augment-ray export 's3://bucket/runs/a b' --format alpaca --to demo.alpaca.jsonl")


# what Ray Data prints when its progress is on (seen with `augment-ray run --debug`)
RAY_DATA_NOISE = ("Running Dataset", "Total Progress", "logging_progress", "Execution plan of",
                  "Starting execution of Dataset", "execution finished in", "Data sink",
                  "Progress bars disabled", "Active & requested resources",
                  # Ray's notice that a new local cluster has token auth on by default
                  "Token authentication is enabled")


@pytest.mark.integration
def test_cli_run_shows_our_progress_as_the_call_runs_and_says_what_next(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    table = pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, 8)
    pq.write_table(table, source / "part-0.parquet")
    out = tmp_path / "out"
    job_file = tmp_path / "job.yaml"
    # batch_size 2: one actor call of 8 rows (4 engine batches), which used to show 0/8 until
    # it returned
    job_file.write_text(yaml.safe_dump({
        "name": "progress-cli", "input": {"uri": str(source)}, "output": {"uri": str(out)},
        "engines": {"m": {"batch_size": 2, "replicas": 1, "num_cpus": 1, "threads": 1,
                          "sampling": {"max_tokens": 12}}},
        "steps": [{"kind": "refine", "engine": "m", "checks": False}],
    }))
    env = {**os.environ, "RAY_ADDRESS": "", "AUGMENT_RAY_PROGRESS_SECONDS": "0.2"}
    env.pop(RAY_PROGRESS_ENV, None)
    done = subprocess.run([*CLI, "run", str(job_file)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in RAY_DATA_NOISE:
        assert noise not in done.stdout + done.stderr, noise
    lines = [line for line in done.stderr.splitlines() if "augment_ray.progress: progress:" in line]
    counts = [int(m.group(1)) for line in lines if (m := re.search(r"refine (\d+)/8", line))]
    assert counts and counts[-1] == 8, lines
    assert any(0 < count < 8 for count in counts), lines  # moved while the one call ran
    assert counts == sorted(counts), lines

    after = done.stdout.split("Next:\n", 1)[1].splitlines()
    assert len(after) == 3, done.stdout
    for line in after:  # every printed command works as printed
        words = shlex.split(line.split("#")[0])
        assert words[0] == "augment-ray"
        ran = subprocess.run([*CLI, *words[1:]], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert ran.returncode == 0, (line, ran.stderr[-2000:])
    assert (out / "_report" / "report.html").exists()
    assert len(Path(f"{out}.alpaca.jsonl").read_text().splitlines()) == 8
