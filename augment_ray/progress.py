"""Progress of a running job: rows done per step, tokens/s and ETA, logged by the driver.

After every step the pipeline adds a light map that tells a `ProgressBoard` actor how many input
rows (rows that came from the input, not rows a step created) have passed the step and how many
tokens the step generated. A thread on the driver reads the board every few seconds and logs one
line; the driver's log is what the terminal shows and what `ray job logs` returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from augment_ray.rows import INPUT_STEP, ORIGIN_STEP

log = logging.getLogger("augment_ray.progress")

INTERVAL_ENV = "AUGMENT_RAY_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 15.0


@dataclass
class StepProgress:
    rows: int = 0  # input-origin rows past the step
    tokens: int = 0  # completion tokens the step generated
    first_seen: float = 0.0
    last_seen: float = 0.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.steps: dict[str, StepProgress] = {}

    def add(self, step: str, rows: int, tokens: int) -> None:
        now = time.time()
        entry = self.steps.setdefault(step, StepProgress(first_seen=now))
        entry.rows += rows
        entry.tokens += tokens
        entry.last_seen = now

    def snapshot(self) -> dict[str, StepProgress]:
        return dict(self.steps)


def count_progress(batch: pa.Table, step: str, board: Any) -> pa.Table:
    """Ray Data UDF after a step: report the batch to the board, pass it on unchanged."""
    rows = len(batch)
    if ORIGIN_STEP in batch.column_names and rows:
        rows = int(pc.sum(pc.equal(batch[ORIGIN_STEP], INPUT_STEP)).as_py() or 0)
    tokens = 0
    column = f"{step}_completion_tokens"
    if column in batch.column_names and len(batch):
        tokens = int(pc.sum(batch[column]).as_py() or 0)
    board.add.remote(step, rows, tokens)  # fire and forget: progress must not slow the run
    return batch


def format_duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(steps: list[str], snapshot: dict[str, StepProgress], total: int | None,
                  elapsed: float) -> str:
    """One line: per step input rows done (of the input's), tokens/s and ETA, all rates over
    the run so far (steps stream concurrently, so no step has a wall time of its own)."""
    parts = []
    elapsed = max(elapsed, 1e-6)
    for name in steps:
        entry = snapshot.get(name)
        done = entry.rows if entry else 0
        part = f"{name} {done:,}" + (f"/{total:,}" if total else "")
        if total:
            part += f" ({100 * done / total:.0f}%)"
        if entry and entry.tokens:
            part += f" {entry.tokens / elapsed:.1f} tok/s"
        if total and 0 < done < total:
            part += f" ETA {format_duration((total - done) * elapsed / done)}"
        parts.append(part)
    return "progress: " + " | ".join(parts)


@dataclass
class ProgressLogger:
    """Logs the board every `interval` seconds on a daemon thread while the run executes."""

    board: Any
    steps: list[str]
    total: int | None  # input rows, when known up front
    ledger: Any = None  # ReadLedger: gives the total once every file is read
    files: int = 0
    interval: float = field(default_factory=lambda: float(
        os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last: str = ""
    _started: float = field(default_factory=time.time)

    def __enter__(self) -> ProgressLogger:
        self._thread = threading.Thread(target=self._loop, name="augment-ray-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc[0] is None:
            self.log_now()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.log_now()

    def log_now(self) -> None:
        try:
            snapshot = ray.get(self.board.snapshot.remote(), timeout=10)
            if self.total is None and self.ledger is not None:
                rows, files = ray.get(self.ledger.totals.remote(), timeout=10)
                self.total = rows if files == self.files else None
        except Exception:  # the board is advisory: never let it break the run
            return
        line = progress_line(self.steps, snapshot, self.total, time.time() - self._started)
        if line != self._last:
            log.info(line)
            self._last = line
