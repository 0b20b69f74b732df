"""How progress looks: the plain log line (`ray job logs`, CI, pipes) and the lines redrawn in
place in a terminal (`LiveBlock`). augment_ray/progress.py gathers the counts."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from augment_ray.progress import StepProgress


def format_duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _counts(entry: StepProgress | None, total: int | None) -> int:
    done = entry.rows if entry else 0
    return min(done, total) if total else done


def progress_line(steps: list[str], snapshot: dict[str, StepProgress], total: int | None,
                  elapsed: float) -> str:
    """One line: per step input rows done (of the input's), tokens/s and ETA, all rates over
    the run so far (steps stream concurrently, so no step has a wall time of its own)."""
    parts = []
    elapsed = max(elapsed, 1e-6)
    for name in steps:
        entry = snapshot.get(name)
        done = _counts(entry, total)
        part = f"{name} {done:,}" + (f"/{total:,}" if total else "")
        if total:
            part += f" ({100 * done / total:.0f}%)"
        if entry and entry.tokens:
            part += f" {entry.tokens / elapsed:.1f} tok/s"
        if total and 0 < done < total:
            part += f" ETA {format_duration((total - done) * elapsed / done)}"
        parts.append(part)
    return "progress: " + " | ".join(parts)


BAR_WIDTH = 24


def progress_rows(steps: list[str], snapshot: dict[str, StepProgress], total: int | None,
                  elapsed: float, unicode: bool = True) -> list[str]:
    """The terminal's lines, one per step: a bar, rows done/total, share, tokens/s, ETA."""
    full, empty = ("█", "░") if unicode else ("#", "-")
    elapsed = max(elapsed, 1e-6)
    name_width = max(len(name) for name in steps) if steps else 0
    rows = []
    for name in steps:
        entry = snapshot.get(name)
        done = _counts(entry, total)
        if total:
            filled = BAR_WIDTH * done // total
            row = (f"{name:<{name_width}}  {full * filled}{empty * (BAR_WIDTH - filled)} "
                   f"{done:>{len(f'{total:,}')},}/{total:,} {100 * done / total:3.0f}%")
        else:
            row = f"{name:<{name_width}}  {done:,} rows"
        if entry and entry.tokens:
            row += f"  {entry.tokens / elapsed:.1f} tok/s"
        if total and 0 < done < total:
            row += f"  ETA {format_duration((total - done) * elapsed / done)}"
        elif total and done >= total:
            row += "  done"
        rows.append(row)
    if rows:
        rows[-1] += f"  [{format_duration(elapsed)}]"
    return rows


UP, ERASE_DOWN = "\x1b[1A", "\x1b[J"


class LiveBlock:
    """Lines redrawn in place at the bottom of a terminal (ANSI cursor-up and erase). With
    `redirect`, whatever else the process writes to the terminal meanwhile (our logs, Ray's
    worker lines) goes through `write_above`: the block is erased, the text printed, the block
    drawn again below it."""

    def __init__(self, stream: TextIO, redirect: bool = False) -> None:
        self.stream = stream
        self.redirect = redirect
        self.lines: list[str] = []
        self._drawn = 0  # lines of the block on screen; the cursor is at the end of the last
        self._midline = False  # text written above ended without a newline
        self._lock = threading.RLock()
        self._restore: list[Any] = []

    @property
    def unicode(self) -> bool:
        return "utf" in (getattr(self.stream, "encoding", None) or "").lower()

    def width(self) -> int:
        try:
            return shutil.get_terminal_size((100, 24)).columns
        except (OSError, ValueError):
            return 100

    def __enter__(self) -> LiveBlock:
        if self.redirect:
            self._install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, lines: list[str]) -> None:
        with self._lock:
            self.lines = list(lines)
            self._erase()
            self._draw()
            self.stream.flush()

    def write_above(self, text: str, stream: TextIO | None = None) -> None:
        target = stream or self.stream
        with self._lock:
            self._erase()
            if target is not self.stream:
                self.stream.flush()
            target.write(text)
            if text:
                self._midline = not text.endswith("\n")
            if not self._midline:
                if target is not self.stream:
                    target.flush()
                self._draw()
            self.stream.flush()

    def close(self) -> None:
        """Leave the last lines on screen, the cursor on a new line below them."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
            self._drawn = 0
            self.lines = []
            self._uninstall()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write("\r" + UP * (self._drawn - 1) + ERASE_DOWN)
            self._drawn = 0

    def _draw(self) -> None:
        if not self.lines:
            return
        if self._midline:
            self.stream.write("\n")
            self._midline = False
        width = max(self.width() - 1, 20)  # a wrapped line would break the cursor-up count
        self.stream.write("\n".join(line[:width] for line in self.lines))
        self._drawn = len(self.lines)

    def _install(self) -> None:
        """Route sys.stdout/sys.stderr (when they are this terminal) and the log handlers that
        write to them through `write_above`."""
        proxies = {}
        for name in ("stderr", "stdout"):
            real = getattr(sys, name)
            if real is self.stream or (name == "stdout" and is_tty(real)):
                proxy = _AboveBlock(self, real)
                proxies[id(real)] = proxy
                setattr(sys, name, proxy)
                self._restore.append((sys, name, real))
        loggers = [logging.getLogger(), *(logger for logger in
                                          list(logging.Logger.manager.loggerDict.values())
                                          if isinstance(logger, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                stream = getattr(handler, "stream", None)
                if type(handler) is logging.StreamHandler and id(stream) in proxies:
                    handler.setStream(proxies[id(stream)])
                    self._restore.append((handler, None, stream))

    def _uninstall(self) -> None:
        while self._restore:
            owner, name, original = self._restore.pop()
            if name is None:
                owner.setStream(original)
            elif getattr(owner, name) is not original:
                setattr(owner, name, original)


class _AboveBlock:
    """A stdout/stderr stand-in whose writes go above the live block."""

    def __init__(self, block: LiveBlock, real: TextIO) -> None:
        self._block = block
        self._real = real

    def write(self, text: str) -> int:
        self._block.write_above(text, self._real)
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
