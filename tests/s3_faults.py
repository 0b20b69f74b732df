"""A fault-injecting proxy in front of an S3-compatible server (the local moto server in tests).

Each request is classed by what it does (read, write, list, copy, delete, head; `other` for
bucket management, never failed) and, for a planned share of each class, answered with a
503 SlowDown or a 500 InternalError (S3's XML error bodies), a connection reset (before or after
the server acted on it), or a delay longer than a short request timeout. Whether a request fails
is a pure function of (seed, operation, object, attempt), where attempt counts the identical
requests seen so far: a rerun with the same seed meets the same faults, and a retry draws anew.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from reverse_proxy import Action, Answer, Drop, Forward, ProxyRequest, ReverseProxy

OPERATIONS = ("read", "write", "list", "copy", "delete", "head")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
ERRORS = {  # kind -> (status, S3 error code, message)
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
DEFAULT_KINDS = (("slowdown", 0.4), ("internal", 0.3), ("reset", 0.2), ("delay", 0.1))


@dataclass(frozen=True)
class S3Request:
    operation: str  # one of OPERATIONS, or "other"
    bucket: str
    key: str

    @property
    def object(self) -> str:
        return f"{self.bucket}/{self.key}"


def classify(request: ProxyRequest) -> S3Request:
    """What an S3 request does and to which object, path-style or virtual-hosted."""
    parts = urlsplit(request.path)
    host = request.headers.get("Host", request.headers.get("host", "")).rsplit(":", 1)[0]
    path = unquote(parts.path).lstrip("/")
    if host not in LOOPBACK_HOSTS and host.endswith(".localhost"):  # virtual-hosted
        bucket, key = host.removesuffix(".localhost"), path
    else:
        bucket, _, key = path.partition("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    headers = {name.lower() for name in request.headers}
    method = request.method
    if bucket.startswith("moto-api") or not bucket:
        operation = "other"
    elif method == "HEAD":
        operation = "head"
    elif method == "GET":
        operation = "read" if key else "list"
    elif method == "PUT" and key:
        operation = "copy" if "x-amz-copy-source" in headers else "write"
    elif method == "POST" and "delete" in query:
        operation = "delete"
    elif method == "POST" and key and ("uploads" in query or "uploadId" in query):
        operation = "write"  # multipart create / complete
    elif method == "DELETE":
        operation = "delete"
    else:
        operation = "other"  # bucket creation and the like
    return S3Request(operation, bucket, key)


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail and how: `shares` maps an operation to the share of its requests
    that fail; `kinds` weighs what a failure is; `key_pattern` (a regex searched in the key)
    limits the faults to matching objects."""

    shares: Mapping[str, float]
    kinds: tuple[tuple[str, float], ...] = DEFAULT_KINDS  # (kind, weight)
    delay_s: float = 3.0  # a "delay" holds the server's answer this long
    seed: int = 0
    key_pattern: str | None = None

    @classmethod
    def everywhere(cls, share: float, **kwargs: object) -> FaultPlan:
        return cls({operation: share for operation in OPERATIONS}, **kwargs)

    def kind_for(self, draw: float) -> str:
        total = sum(weight for _, weight in self.kinds)
        edge = 0.0
        for kind, weight in self.kinds:
            edge += weight / total
            if draw < edge:
                return kind
        return self.kinds[-1][0]


def unit(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def error_body(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>/{resource}</Resource>"
            "<RequestId>augment-ray-fault</RequestId></Error>").encode()


class S3FaultProxy(ReverseProxy):
    """The proxy; `counts[(operation, outcome)]` tallies what it did (outcome: "ok" or a kind).
    Assign `plan` (and call `reset`) to change the faults between runs."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        super().__init__(upstream)
        self.plan = plan or FaultPlan({})
        self.counts: Counter[tuple[str, str]] = Counter()
        self._attempts: Counter[tuple[str, ...]] = Counter()

    def reset(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan
            self.counts.clear()
            self._attempts.clear()

    def decide(self, request: ProxyRequest) -> Action:
        s3 = classify(request)
        identity = (s3.operation, request.method, s3.object, urlsplit(request.path).query,
                    request.headers.get("Range", request.headers.get("range", "")))
        with self._lock:
            self._attempts[identity] += 1
            attempt = self._attempts[identity]
        share = self.plan.shares.get(s3.operation, 0.0)
        matches = self.plan.key_pattern is None or re.search(self.plan.key_pattern, s3.key)
        fails = bool(matches) and unit(self.plan.seed, *identity, attempt) < share
        kind = self.plan.kind_for(unit(self.plan.seed, "kind", *identity, attempt)) \
            if fails else "ok"
        with self._lock:
            self.counts[(s3.operation, kind)] += 1
        return self.action(kind, request, s3, unit(self.plan.seed, "how", *identity, attempt))

    def action(self, kind: str, request: ProxyRequest, s3: S3Request, draw: float) -> Action:
        if kind == "ok":
            return Forward()
        if kind == "delay":
            return Forward(delay_s=self.plan.delay_s)
        if kind == "reset":
            return Drop(forward_first=draw < 0.5)
        status, code, message = ERRORS[kind]
        body = b"" if request.method == "HEAD" else error_body(code, message, s3.object)
        return Answer(status, body, {"Content-Type": "application/xml"})

    def failed(self, operation: str | None = None) -> int:
        return sum(n for (op, outcome), n in self.counts.items()
                   if outcome != "ok" and operation in (None, op))

    def seen(self, operation: str) -> int:
        return sum(n for (op, _), n in self.counts.items() if op == operation)
