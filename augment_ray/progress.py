"""Progress of a running job: rows done per step, tokens/s and ETA, shown by the driver.

After every step the pipeline adds a light map that tells a `ProgressBoard` actor how many input
rows (rows that came from the input, not rows a step created) have passed the step and how many
tokens the step generated: the exact counts. While an engine-pool call runs (128 rows of a
small CPU model take minutes), the runner also tells the board after every engine sub-batch how
far the call has got (`CallProgress`): provisional counts that the board drops once the call's
rows are counted after the step, so nothing is counted twice.

A thread on the driver reads the board and shows it: in a terminal, one line per step redrawn
in place every second (`LiveBlock`, other output scrolls above it); elsewhere (`ray job logs`,
CI, a pipe) one log line every AUGMENT_RAY_PROGRESS_SECONDS. Ray Data's own progress bars and
per-dataset INFO logs stay off the terminal (`quiet_ray_data`) unless AUGMENT_RAY_RAY_PROGRESS=1
(`augment-ray run --debug` sets it); they are still written to Ray Data's log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from augment_ray.progress_display import LiveBlock, is_tty, progress_line, progress_rows
from augment_ray.rows import INPUT_STEP, ORIGIN_STEP

log = logging.getLogger("augment_ray.progress")

INTERVAL_ENV = "AUGMENT_RAY_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 15.0
LIVE_INTERVAL_S = 1.0  # how often the terminal's lines are redrawn
RAY_PROGRESS_ENV = "AUGMENT_RAY_RAY_PROGRESS"  # 1: Ray Data's own progress bars and logs too


@dataclass
class StepProgress:
    rows: int = 0  # input-origin rows past the step
    tokens: int = 0  # completion tokens the step generated
    first_seen: float = 0.0
    last_seen: float = 0.0


class Board:
    """Exact counts (`add`, after each step) plus, per step, the provisional counts of engine
    calls still running and of calls finished but not yet counted after the step."""

    def __init__(self) -> None:
        self.steps: dict[str, StepProgress] = {}
        self.running: dict[str, dict[str, tuple[int, int]]] = {}  # step -> call -> rows, tokens
        # rows, tokens of finished calls minus what the after-step count has added since (it
        # can run before the call's finish arrives: the balance may dip below zero meanwhile)
        self.pending: dict[str, list[int]] = {}
        self.placements: dict[str, dict[str, int]] = {}  # step -> node id -> actors started
        self.loads: dict[str, int] = {}  # engine -> model copies loaded

    def placed(self, step: str, node_id: str) -> None:
        nodes = self.placements.setdefault(step, {})
        nodes[node_id] = nodes.get(node_id, 0) + 1

    def placement(self) -> dict[str, dict[str, int]]:
        """Per step, the nodes its engine actors started on (a restarted actor counts again)."""
        return {step: dict(nodes) for step, nodes in self.placements.items()}

    def loaded(self, engine: str) -> None:
        self.loads[engine] = self.loads.get(engine, 0) + 1

    def model_loads(self) -> dict[str, int]:
        """Per engine, the model copies its actors loaded (a restarted actor loads again)."""
        return dict(self.loads)

    def add(self, step: str, rows: int, tokens: int) -> None:
        now = time.time()
        entry = self.steps.setdefault(step, StepProgress(first_seen=now))
        entry.rows += rows
        entry.tokens += tokens
        entry.last_seen = now
        pending = self.pending.setdefault(step, [0, 0])
        pending[0] -= rows
        pending[1] -= tokens

    def call_running(self, step: str, call: str, rows: int, tokens: int) -> None:
        self.running.setdefault(step, {})[call] = (rows, tokens)

    def call_finished(self, step: str, call: str, rows: int, tokens: int) -> None:
        self.running.get(step, {}).pop(call, None)
        pending = self.pending.setdefault(step, [0, 0])
        pending[0] += rows
        pending[1] += tokens

    def call_dropped(self, step: str, call: str) -> None:  # the call raised; it is retried
        self.running.get(step, {}).pop(call, None)

    def snapshot(self) -> dict[str, StepProgress]:
        """The exact counts."""
        return dict(self.steps)

    def live(self) -> dict[str, StepProgress]:
        """The exact counts plus what running engine calls have done so far."""
        return live_counts(self.steps, self.running, self.pending)


ProgressBoard = ray.remote(num_cpus=0)(Board)  # one actor per run


def tell_placement(board: Any, step: str) -> None:
    """An engine actor of `step` started: tell the board which node it runs on. Never raises."""
    if board is None:
        return
    with contextlib.suppress(Exception):
        board.placed.remote(step, ray.get_runtime_context().get_node_id())


def tell_model_load(board: Any, engine: str) -> None:
    """An actor loaded `engine`'s model. Never raises."""
    if board is None:
        return
    with contextlib.suppress(Exception):
        board.loaded.remote(engine)


def live_counts(steps: dict[str, StepProgress], running: dict[str, dict[str, tuple[int, int]]],
                pending: dict[str, list[int]]) -> dict[str, StepProgress]:
    merged = {}
    for name in {*steps, *running}:
        exact = steps.get(name, StepProgress())
        calls = running.get(name, {}).values()
        owed_rows, owed_tokens = pending.get(name, [0, 0])
        merged[name] = StepProgress(
            rows=exact.rows + max(0, owed_rows + sum(rows for rows, _ in calls)),
            tokens=exact.tokens + max(0, owed_tokens + sum(tokens for _, tokens in calls)),
            first_seen=exact.first_seen, last_seen=exact.last_seen,
        )
    return merged


_RUN_BOARD: Any = None


@contextlib.contextmanager
def board_of_run(board: Any) -> Iterator[None]:
    """While a run's steps are built (on the driver), `current_board()` is its board."""
    global _RUN_BOARD
    _RUN_BOARD = board
    try:
        yield
    finally:
        _RUN_BOARD = None


def current_board() -> Any:
    return _RUN_BOARD


def input_rows(batch: pa.Table) -> int:
    """Rows of `batch` that came from the input (not rows a step created)."""
    if ORIGIN_STEP in batch.column_names and len(batch):
        return int(pc.sum(pc.equal(batch[ORIGIN_STEP], INPUT_STEP)).as_py() or 0)
    return len(batch)


def count_progress(batch: pa.Table, step: str, board: Any) -> pa.Table:
    """Ray Data UDF after a step: report the batch to the board, pass it on unchanged."""
    tokens = 0
    column = f"{step}_completion_tokens"
    if column in batch.column_names and len(batch):
        tokens = int(pc.sum(batch[column]).as_py() or 0)
    board.add.remote(step, input_rows(batch), tokens)  # fire and forget: never slows the run
    return batch


class CallProgress:
    """One engine-pool call (a batch of `rows` input rows, `prompts` first-attempt prompts) as
    it runs. The engine calls it after each generated sub-batch with (prompts finished,
    completion tokens); it tells the board the share of the call's rows done so far. Fire and
    forget, and it never raises: progress must not slow or break the run."""

    def __init__(self, board: Any, step: str, rows: int, prompts: int) -> None:
        self.board = board
        self.step = step
        self.rows = rows
        self.prompts = prompts
        self.key = uuid.uuid4().hex
        self.prompts_done = 0
        self.tokens = 0

    def __call__(self, prompts: int, tokens: int) -> None:
        self.prompts_done += prompts
        self.tokens += tokens
        if self.prompts:  # retries can finish more prompts than the call had: cap
            rows = min(self.rows, self.rows * self.prompts_done // self.prompts)
            self._tell("call_running", rows, self.tokens)

    def finished(self, tokens: int) -> None:
        """The call returns its rows; `tokens` are those its rows carry (the after-step count
        will add the same)."""
        self._tell("call_finished", self.rows, tokens)

    def dropped(self) -> None:
        self._tell("call_dropped")

    def _tell(self, method: str, *args: int) -> None:
        if self.board is None:
            return
        with contextlib.suppress(Exception):
            getattr(self.board, method).remote(self.step, self.key, *args)


# ---- Ray Data's own progress output ----------------------------------------------------------

def ray_progress_wanted() -> bool:
    return os.environ.get(RAY_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _ray_data_console_noise(record: logging.LogRecord) -> bool:
    """Filter of Ray Data's console handler: its INFO lines (execution plans, 'Dataset ...
    finished', progress blocks) and the note that progress bars are off stay in its log file."""
    if record.levelno < logging.WARNING:
        return False
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_data() -> None:
    """Keep Ray Data's progress bars / ten-second progress blocks and INFO logs off the
    terminal (unless AUGMENT_RAY_RAY_PROGRESS=1): our progress replaces them. Their warnings
    and errors still show."""
    if ray_progress_wanted():
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # Ray Data's progress manager becomes a no-op
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        # Ray's console handler (PlainRayHandler), not its file handler nor anyone else's
        if isinstance(handler, logging.StreamHandler) and \
                type(handler).__module__.startswith("ray.") and \
                _ray_data_console_noise not in handler.filters:
            handler.addFilter(_ray_data_console_noise)


def quiet_model_loading() -> None:
    """In an engine actor: no 'Loading weights' progress bar per model load."""
    if ray_progress_wanted():
        return
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def live_terminal(stream: Any) -> bool:
    """Redraw lines in place: `stream` is a terminal that understands ANSI, and Ray Data's own
    progress bars (which would draw over ours) are off."""
    return is_tty(stream) and os.environ.get("TERM", "") != "dumb" and not ray_progress_wanted()


def _get(ref: Any) -> Any:
    return ray.get(ref, timeout=10) if isinstance(ref, ray.ObjectRef) else ref


def _interval() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)), 0.05)
    except ValueError:
        return DEFAULT_INTERVAL_S


@dataclass
class ProgressLogger:
    """Shows the board while the run executes, on a daemon thread: redrawn lines every second
    in a terminal, else a log line every `interval` seconds; a last one with the exact counts."""

    board: Any
    steps: list[str]
    total: int | None  # input rows, when known up front
    ledger: Any = None  # ReadLedger: gives the total once every file is read
    files: int = 0
    interval: float = field(default_factory=_interval)
    stream: Any = None  # where live lines go; default sys.stderr
    live: bool | None = None  # redraw in place; default: when `stream` is a terminal
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _block: LiveBlock | None = None
    _last: str = ""
    _started: float = field(default_factory=time.time)

    def __enter__(self) -> ProgressLogger:
        stream = self.stream or sys.stderr
        if self.live is None:
            self.live = live_terminal(stream)
        if self.live:
            self._block = LiveBlock(stream, redirect=self.stream is None).__enter__()
        self._thread = threading.Thread(target=self._loop, name="augment-ray-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if exc[0] is None:
                self.log_now(final=True)
        finally:
            if self._block is not None:
                self._block.close()

    def _loop(self) -> None:
        wait = min(self.interval, LIVE_INTERVAL_S) if self.live else self.interval
        while not self._stop.wait(wait):
            self.log_now()

    def log_now(self, final: bool = False) -> None:
        try:  # the exact counts at the end; while running, with the engine calls' share
            board = self.board.snapshot if final else self.board.live
            snapshot = _get(board.remote())
            if self.total is None and self.ledger is not None:
                rows, files = _get(self.ledger.totals.remote())
                self.total = rows if files == self.files else None
        except Exception:  # the board is advisory: never let it break the run
            return
        elapsed = time.time() - self._started
        if self._block is not None:
            self._block.update(progress_rows(self.steps, snapshot, self.total, elapsed,
                                             self._block.unicode))
            return
        line = progress_line(self.steps, snapshot, self.total, elapsed)
        if line != self._last:
            log.info(line)
            self._last = line
