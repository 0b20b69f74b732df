"""One writer per output: a run holds a lease on its output folder from before it clears it
until after it commits. A second run of the same output (a scheduler retrying while the first
attempt is alive, two cron hosts) is refused with a message naming the holder. The holder
renews the lease every quarter of `timeout_s`; a lease not renewed for longer than that was
left by a run that died and is taken over (at once when its holder ran on this host and its
process is gone). The commit checks the lease is still this run's first.

It keeps two runs from both writing and both committing; it is not a fencing token: a holder
that stalled past the timeout and lost its lease may still write into _staging/ until its next
renewal or its commit check stops it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from augment_ray.errors import LeaseLostError, OutputLeasedError, StorageError
from augment_ray.io.lease_stores import LEASE, LeaseStore, lease_store
from augment_ray.storage import Location, redact_uri

log = logging.getLogger(__name__)

__all__ = ["LEASE", "LeaseRecord", "OutputLease", "held_message", "output_lease"]


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease file says: who holds it and since when (epoch seconds, UTC)."""

    run_id: str
    job: str
    host: str
    pid: int
    pid_started: float | None
    acquired_at: float
    renewed_at: float
    timeout_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # unreadable: treated as stale

    def stale(self, now: float) -> bool:
        return now - self.renewed_at > self.timeout_s

    def dead_on_this_host(self) -> bool:
        """The holder ran here and its process is gone (or the pid is another process now)."""
        if self.host != socket.gethostname():
            return False
        started = _process_started(self.pid)
        return started is None or (self.pid_started is not None
                                   and abs(started - self.pid_started) > 1.0)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def held_message(uri: str, holder: LeaseRecord, now: float) -> str:
    return (
        f"Output {redact_uri(uri)} is being written by another run: run {holder.run_id} "
        f"(job {holder.job}) on host {holder.host}, pid {holder.pid}, started "
        f"{_when(holder.acquired_at)}, lease renewed {now - holder.renewed_at:.0f}s ago. Two "
        "runs must not write one output, so this one did not start. Wait for that run to "
        "finish; if it died, run again after "
        f"{_when(holder.renewed_at + holder.timeout_s)} (its lease expires "
        f"{holder.timeout_s:g}s after its last renewal: reliability.lease_timeout_s)."
    )


class OutputLease:
    """The lease of one run on one output; `held()` takes it, renews it and gives it back."""

    def __init__(self, output: Location, run_id: str, job: str, timeout_s: float,
                 store: LeaseStore | None = None) -> None:
        self.output = output
        self.store = store or lease_store(output)
        now = time.time()
        self.record = LeaseRecord(run_id, job, socket.gethostname(), os.getpid(),
                                  _process_started(os.getpid()), now, now, timeout_s)
        self.token: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _store_call(self, action: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except (OSError, TimeoutError) as error:
            raise StorageError(f"Cannot {action} {redact_uri(self.output.uri)}/{LEASE}: "
                               f"{error}.") from None
        except Exception as error:  # botocore's ClientError / BotoCoreError
            if type(error).__module__.startswith(("botocore", "boto3")):
                raise StorageError(f"Cannot {action} {redact_uri(self.output.uri)}/{LEASE}: "
                                   f"{error}.") from None
            raise

    def _adopt_if_ours(self, current: Any) -> bool:
        """A conditional write refused (412) because an earlier try of that very request went
        through, its answer lost to a reset or a timeout, and the client retried: the lease
        names this run, so it is ours, under the store's current token."""
        holder = LeaseRecord.parse(current.data) if current is not None else None
        mine = self.record
        if holder is None or (holder.run_id, holder.host, holder.pid) != (
                mine.run_id, mine.host, mine.pid):
            return False
        self.record, self.token = holder, current.token
        return True

    def acquire(self) -> None:
        for _ in range(3):  # a lease released between our create and our read: try again
            self.token = self._store_call("create the lease", self.store.create,
                                          self.record.to_bytes())
            if self.token is not None:
                return
            current = self._store_call("read the lease", self.store.read)
            if current is None:
                continue
            if self._adopt_if_ours(current):
                return
            holder = LeaseRecord.parse(current.data)
            now = time.time()
            if holder is not None and not holder.stale(now) and not holder.dead_on_this_host():
                raise OutputLeasedError(held_message(self.output.uri, holder, now))
            self.token = self._store_call("take over the lease", self.store.replace,
                                          self.record.to_bytes(), current.token)
            if self.token is None and self._adopt_if_ours(
                    self._store_call("read the lease", self.store.read)):
                return
            if self.token is not None:
                log.warning("Took over the lease of %s from run %s, which stopped renewing it "
                            "(a crashed or killed run).", redact_uri(self.output.uri),
                            holder.run_id if holder else "(unreadable lease)")
                return
        current = self.store.read()
        holder = LeaseRecord.parse(current.data) if current else None
        if holder is None:
            raise OutputLeasedError(f"Output {redact_uri(self.output.uri)}: another run keeps "
                                    "taking its lease; try again.")
        raise OutputLeasedError(held_message(self.output.uri, holder, time.time()))

    def renew(self) -> None:
        """Stamp the lease anew, if it is still ours (else mark it lost)."""
        if self.token is None or self.lost:
            return
        record = LeaseRecord(**{**asdict(self.record), "renewed_at": time.time()})
        token = self.store.replace(record.to_bytes(), self.token)
        if token is None:
            current = self.store.read()
            if self._adopt_if_ours(current):
                return
            holder = LeaseRecord.parse(current.data) if current else None
            self.lost = f"run {holder.run_id} on host {holder.host}" if holder else "nobody"
            log.error("The lease of %s was taken over by %s; this run will not commit.",
                      redact_uri(self.output.uri), self.lost)
            return
        self.record, self.token = record, token

    def _renew_forever(self) -> None:
        period = max(self.record.timeout_s / 4, 0.2)
        while not self._stop.wait(period):
            try:
                self.renew()
            except Exception as error:
                log.warning("Could not renew the lease of %s: %s", redact_uri(self.output.uri),
                            error)
            if self.lost or time.time() - self.record.renewed_at > self.record.timeout_s:
                self.lost = self.lost or "nobody (renewals failed for longer than the timeout)"
                return

    def check(self) -> None:
        """Before committing: the lease must still be this run's."""
        if not self.lost:
            self._store_call("renew the lease", self.renew)
        if self.lost:
            raise LeaseLostError(
                f"This run lost its lease on {redact_uri(self.output.uri)} to {self.lost} "
                "(it could not renew it for longer than reliability.lease_timeout_s), so it "
                "did not commit: the run that took it over writes the output."
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if self.token is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.store.delete(self.token)
        self.token = None

    @contextlib.contextmanager
    def held(self) -> Iterator[OutputLease]:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_forever, name="output-lease",
                                         daemon=True)
        self._renewer.start()
        try:
            yield self
        finally:
            self.release()


def output_lease(output: Location, run_id: str, job: str, timeout_s: float) -> OutputLease:
    return OutputLease(output, run_id, job, timeout_s)
