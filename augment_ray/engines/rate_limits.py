"""Client-side requests/min and tokens/min limits of a hosted endpoint, shared by every
replica of an engine pool.

Each limit paces its units evenly rather than letting a minute's worth out at once: a
reservation of n units goes out when the limit's backlog has drained, and adds n / rate seconds
to it. So any window of T seconds sees at most rate * T units plus the one reservation that
crossed its end: a minute never more than the limit plus one request, and the quantized
per-second limits providers enforce ("60,000 rpm may be enforced as 1,000 per second") hold
too. A reservation is booked at once and answered with how long to wait, so a sender sleeps
instead of polling.

Inside Ray the limits live in one small named actor (no CPUs) per run and endpoint, created by
whichever replica asks first (`get_if_exists`); every replica reserves there, one call per
request (well under a millisecond against the seconds a hosted request takes). Outside Ray
(unit use, scripts) they are a local object.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

MINUTE_S = 60.0


@dataclass
class Pace:
    """One limit of `per_minute` units. `due` is when its backlog has drained (time.monotonic)."""

    per_minute: int
    due: float = 0.0

    @property
    def rate(self) -> float:
        return self.per_minute / MINUTE_S

    def book(self, units: float, at: float) -> None:
        self.due = max(self.due, at) + units / self.rate


@dataclass
class RateLimits:
    """requests/min and tokens/min (either may be None: no limit). Not thread-safe: the actor
    runs one call at a time, LocalLimiter holds a lock."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    paces: dict[str, Pace] = field(init=False)

    def __post_init__(self) -> None:
        self.paces = {name: Pace(limit) for name, limit in
                      (("requests", self.requests_per_minute),
                       ("tokens", self.tokens_per_minute)) if limit}

    def reserve(self, tokens: int) -> float:
        """Book one request of (an estimated) `tokens`; seconds to wait before sending it."""
        now = time.monotonic()
        at = max([now, *(pace.due for pace in self.paces.values())])
        units = {"requests": 1, "tokens": tokens}
        for name, pace in self.paces.items():
            pace.book(units[name], at)
        return at - now

    def settle(self, reserved: int, used: int) -> None:
        """A request booked `reserved` tokens and used `used`: give back (or take) the
        difference, so later requests are paced by what the server counts."""
        pace = self.paces.get("tokens")
        if pace is not None and used != reserved:
            pace.due += (used - reserved) / pace.rate


class LocalLimiter:
    """The limits of one process (no Ray): threads of one engine share them."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self._limits = RateLimits(requests_per_minute, tokens_per_minute)
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> None:
        with self._lock:
            delay = self._limits.reserve(tokens)
        if delay > 0:
            time.sleep(delay)

    def settle(self, reserved: int, used: int) -> None:
        with self._lock:
            self._limits.settle(reserved, used)


SharedLimits = ray.remote(num_cpus=0)(RateLimits)


class SharedLimiter:
    """The limits in the run's named actor: every replica that names the same endpoint and
    limits gets the same actor."""

    def __init__(self, name: str, requests_per_minute: int | None,
                 tokens_per_minute: int | None) -> None:
        self.name = name
        self.args = (requests_per_minute, tokens_per_minute)
        self._lock = threading.Lock()
        self._actor = self._get_actor()

    def _get_actor(self) -> Any:
        return SharedLimits.options(name=self.name, get_if_exists=True).remote(*self.args)

    def acquire(self, tokens: int) -> None:
        try:
            delay = ray.get(self._actor.reserve.remote(tokens))
        except ray.exceptions.RayActorError:  # its owner (the replica that made it) is gone
            with self._lock:
                self._actor = self._get_actor()
            delay = ray.get(self._actor.reserve.remote(tokens))
        if delay > 0:
            time.sleep(delay)

    def settle(self, reserved: int, used: int) -> None:
        if used != reserved:
            self._actor.settle.remote(reserved, used)  # fire and forget


Limiter = LocalLimiter | SharedLimiter


def limiter_for(key: str, requests_per_minute: int | None, tokens_per_minute: int | None
                ) -> Limiter | None:
    """The limiter of endpoint `key` (e.g. base URL + model + key variable), or None when
    neither limit is set: shared through Ray when this process is part of one."""
    if not requests_per_minute and not tokens_per_minute:
        return None
    if not ray.is_initialized():
        return LocalLimiter(requests_per_minute, tokens_per_minute)
    job = ray.get_runtime_context().get_job_id()
    digest = hashlib.blake2b(f"{key}\x1f{requests_per_minute}\x1f{tokens_per_minute}".encode(),
                             digest_size=8).hexdigest()
    return SharedLimiter(f"augment-ray-limits-{job}-{digest}", requests_per_minute,
                         tokens_per_minute)
