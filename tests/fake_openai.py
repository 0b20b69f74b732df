"""A local OpenAI-compatible chat server for the rate-limit and throughput tests and benchmark
(tests/test_openai_limits.py, benchmarks/openai_limits.py): a spread of latencies, one prompt
in `slow_every` answered `slow_s` late, and its own requests/min and tokens/min limits enforced
as a provider does (429 over the limit, counted in a sliding window). It records when every
request arrived and what it cost, so a test measures the client's rate where it counts."""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
import time
from dataclasses import dataclass

from reverse_proxy import Action, Answer, ProxyRequest, ReverseProxy

COMPLETION_TOKENS = 12
SLOW = "[slow]"  # a prompt with this in it is answered slow_s late


def prompt_tokens(body: dict) -> int:
    """The server's own count: ~4 characters a token."""
    return sum(len(str(m.get("content", ""))) // 4 + 1 for m in body["messages"])


@dataclass
class Arrival:
    at: float  # time.monotonic() when the request arrived
    tokens: int  # prompt + completion tokens it cost
    status: int


class FakeOpenAI(ReverseProxy):
    """`latency_s` (lo, hi): each prompt's latency, spread evenly by its hash; a prompt
    that contains SLOW takes `slow_s`. `requests_per_window` / `tokens_per_window`
    over `window_s` seconds: the server's limits (None: none)."""

    def __init__(self, latency_s: tuple[float, float] = (0.04, 0.08), slow_s: float = 1.0,
                 window_s: float = 60.0,
                 requests_per_window: int | None = None,
                 tokens_per_window: int | None = None) -> None:
        super().__init__(None)
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.window_s = window_s
        self.requests_per_window = requests_per_window
        self.tokens_per_window = tokens_per_window
        self.arrivals: list[Arrival] = []
        self.answers: dict[str, str] = {}  # answer text -> the prompt it answered
        self.in_flight = self.most_in_flight = 0  # requests being answered (200s)
        self._answering: set[int] = set()
        self._limit_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def decide(self, request: ProxyRequest) -> Action:
        body = json.loads(request.body)
        content = json.dumps(body["messages"], sort_keys=True)
        digest = int.from_bytes(hashlib.blake2b(content.encode(), digest_size=8).digest(), "big")
        tokens = prompt_tokens(body) + COMPLETION_TOKENS
        with self._limit_lock:
            now = time.monotonic()
            status = 429 if self._over_limit(now, tokens) else 200
            self.arrivals.append(Arrival(now, tokens, status))
        if status == 429:
            return Answer(429, b"rate limit exceeded", {"Retry-After": "0.2"})
        if SLOW in content:
            delay = self.slow_s
        else:
            low, high = self.latency_s
            delay = low + (high - low) * (digest % 1000) / 999
        text = f"<refined>Answer {digest:016x} {body.get('seed')}</refined>"
        with self._limit_lock:
            self.answers[text] = content
            self._answering.add(request.index)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        reply = {
            "choices": [{"message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens - COMPLETION_TOKENS,
                      "completion_tokens": COMPLETION_TOKENS},
        }
        return Answer(200, json.dumps(reply).encode(), {"Content-Type": "application/json"},
                      delay_s=delay)

    def replied(self, request: ProxyRequest) -> None:
        with self._limit_lock:
            if request.index in self._answering:
                self._answering.discard(request.index)
                self.in_flight -= 1

    def _over_limit(self, now: float, tokens: int) -> bool:
        """As providers count: the requests and tokens they accepted in the window."""
        recent = [a for a in self.arrivals[-5000:]
                  if a.at > now - self.window_s and a.status == 200]
        if self.requests_per_window is not None and \
                len(recent) + 1 > self.requests_per_window:
            return True
        return self.tokens_per_window is not None and \
            sum(a.tokens for a in recent) + tokens > self.tokens_per_window

    def peak(self, window_s: float) -> tuple[int, int]:
        """The most requests (any answer) and tokens (answered) that arrived in any window of
        `window_s` seconds."""
        times = [a.at for a in self.arrivals]
        most_requests = most_tokens = 0
        for start, arrival in enumerate(self.arrivals):
            end = bisect.bisect_right(times, arrival.at + window_s - 1e-9)
            most_requests = max(most_requests, end - start)
            most_tokens = max(most_tokens, sum(a.tokens for a in self.arrivals[start:end]
                                               if a.status == 200))
        return most_requests, most_tokens
