"""The openai engine at a hosted endpoint's limits: requests/min against the limit, and
throughput with one slow request in 32 against none, today's engine against the new one.

A local OpenAI-compatible server (tests/fake_openai.py) answers in 40-80 ms (spread by prompt),
a prompt marked slow in --slow-s, and enforces its own requests/min (429 over it, counted in a
sliding window of --window-s seconds as a provider does; per-minute figures below are that
window's counts scaled to a minute). Every case sends --requests prompts in batches of 32 (the
engine's default batch_size) with max_concurrency 8:

- today: one generate() call at a time, no client-side limits (the engine before this change:
  a batch waits for its slowest request before the next starts; 429s are retried);
- new: OpenAIEngine.concurrent_calls(spec) calls at once sharing the 8 request slots (what a
  pool actor now runs), max_requests_per_minute set to the server's limit.

Each (engine, slow) case runs with the server limiting (--rpm) and without any limit. Also
measured: a shared limiter's reservation round trip on a local Ray (one call per request).

Usage: python benchmarks/openai_limits.py [--requests 1024] [--rpm 3600]
       [--out benchmarks/results/openai-limits.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fake server lives beside the tests

from fake_openai import SLOW, FakeOpenAI  # noqa: E402
from reverse_proxy import running  # noqa: E402

from augment_ray.config.base import SamplingParams  # noqa: E402
from augment_ray.engines.base import Completion  # noqa: E402
from augment_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineSpec  # noqa: E402

BATCH = 32
CONCURRENCY = 8
SLOW_AT = 17  # which prompt of each 32 is slow
SAMPLING = SamplingParams(temperature=0.0, max_tokens=16)


def run_case(requests: int, slow: bool, new: bool, rpm: int | None, window_s: float,
             slow_s: float) -> dict[str, Any]:
    server = FakeOpenAI(latency_s=(0.04, 0.08), slow_s=slow_s, window_s=window_s,
                        requests_per_window=int(rpm * window_s / 60) if rpm else None)
    prompts = [[{"role": "user", "content": f"Say hello number {i}"
                 + (f" {SLOW}" if slow and i % BATCH == SLOW_AT else "")}]
               for i in range(requests)]
    batches = [prompts[i:i + BATCH] for i in range(0, requests, BATCH)]
    with running(server):
        spec = OpenAIEngineSpec.model_validate({
            "kind": "openai", "base_url": server.base_url, "model": "fake",
            "max_concurrency": CONCURRENCY, "backoff_s": 0.2, "max_backoff_s": 2.0,
            "max_retries": 10, "max_requests_per_minute": rpm if new else None})
        engine = OpenAIEngine(spec)
        calls = OpenAIEngine.concurrent_calls(spec) if new else 1
        started = time.perf_counter()
        with ThreadPoolExecutor(calls) as pool:
            results = [r for answers in pool.map(lambda b: engine.generate(b, SAMPLING),
                                                 batches) for r in answers]
        seconds = time.perf_counter() - started
        engine.close()
    peak, _ = server.peak(window_s)
    return {
        "answered": sum(isinstance(r, Completion) for r in results),
        "seconds": round(seconds, 2),
        "answered_per_s": round(requests / seconds, 1),
        "sent_per_min_peak": round(peak * 60 / window_s),
        "responses_429": sum(a.status == 429 for a in server.arrivals),
    }


def reservation_round_trip(calls: int = 2000) -> dict[str, Any]:
    """ms per SharedLimiter.acquire on a local Ray, the limit far from binding."""
    import ray

    from augment_ray.engines.rate_limits import limiter_for

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        limiter = limiter_for("bench", 10**9, None)
        limiter.acquire(1)  # the actor starts
        started = time.perf_counter()
        for _ in range(calls):
            limiter.acquire(1)
        return {"calls": calls, "ms_per_reservation": round(
            (time.perf_counter() - started) / calls * 1000, 3)}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--rpm", type=int, default=3600)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--slow-s", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/openai-limits.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the engines' retry lines of today's 429s

    cases: dict[str, Any] = {}
    for limited in (True, False):
        rpm = args.rpm if limited else None
        for engine in ("today", "new"):
            runs = {slow: run_case(args.requests, slow, engine == "new", rpm, args.window_s,
                                   args.slow_s) for slow in (False, True)}
            cases[f"{engine}, {'server limit' if limited else 'no limit'}"] = {
                "no_slow": runs[False], "one_slow_in_32": runs[True],
                "slow_over_no_slow": round(runs[True]["answered_per_s"]
                                           / runs[False]["answered_per_s"], 3)}
    result = {
        "setup": {"requests": args.requests, "batch": BATCH, "max_concurrency": CONCURRENCY,
                  "server_rpm_limit": args.rpm, "window_s": args.window_s,
                  "latency_s": [0.04, 0.08], "slow_s": args.slow_s,
                  "python": platform.python_version(), "machine": platform.machine()},
        "cases": cases,
        "shared_limiter": reservation_round_trip(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
