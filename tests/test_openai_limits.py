"""The openai engine at a hosted endpoint's limits, against a real local server with a spread of
latencies and its own rate limits (tests/fake_openai.py): requests/min and tokens/min measured
at the server stay within 5% of the client-side limits, one slow request in 32 does not slow
the pool (request slots stay full across batches), and a CLI run with two replicas shares one
limit and still answers every row with its own answer.

Per-minute limits are scaled to seconds so that each test takes seconds: a limit of L/min is
checked as L * W / 60 requests in any window of W seconds at the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fake_openai import SLOW, FakeOpenAI
from reverse_proxy import running

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion, Messages
from augment_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineSpec, estimated_tokens

ROOT = Path(__file__).resolve().parents[1]
# the server's window; per-minute limits are checked per WINDOW_S. A stalled client (a busy
# test machine) sends late requests together: a 60 s window hardly notices, a 1 s one would
WINDOW_S = 3.0
SAMPLING = SamplingParams(temperature=0.0, max_tokens=16)
TOLERANCE = 1.05


def per_window(per_minute: int) -> int:
    return int(per_minute * WINDOW_S / 60)


def engine_for(server: FakeOpenAI, **overrides: object) -> OpenAIEngine:
    values: dict = {"kind": "openai", "base_url": server.base_url, "model": "fake",
                    "max_concurrency": 8, "backoff_s": 0.05, "max_backoff_s": 0.5,
                    "timeout_s": 30, **overrides}
    return OpenAIEngine(OpenAIEngineSpec.model_validate(values))


def prompts(n: int, slow_at: int | None = None) -> list[Messages]:
    """`n` prompts; with `slow_at`, prompt i is slow when i % 32 == slow_at."""
    return [[{"role": "user", "content": f"Say hello number {i}"
              + (f" {SLOW}" if slow_at is not None and i % 32 == slow_at else "")}]
            for i in range(n)]


def run_batches(engine: OpenAIEngine, todo: list[Messages], batch: int, calls: int
                ) -> tuple[list, float]:
    """`todo` in batches of `batch`, `calls` generate() calls at once: what a pool actor
    running `calls` Ray Data batches at once does. (results, seconds)."""
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        results = [r for answers in pool.map(lambda b: engine.generate(b, SAMPLING), batches)
                   for r in answers]
    return results, time.perf_counter() - started


def run_limited(server: FakeOpenAI, n: int, **limits: int) -> tuple[list, float]:
    """n prompts in batches of 32 through an engine with `limits`, against `server`; every one
    answered."""
    with running(server):
        engine = engine_for(server, **limits)
        results, seconds = run_batches(engine, prompts(n), 32,
                                       OpenAIEngine.concurrent_calls(engine.spec))
        engine.close()
    assert all(isinstance(r, Completion) for r in results)
    return results, seconds


def test_requests_per_minute_hold_at_the_server() -> None:
    rpm = 1800  # 30/s; the server alone could answer ~130/s at this concurrency
    server = FakeOpenAI(window_s=WINDOW_S, requests_per_window=per_window(rpm))
    _, seconds = run_limited(server, 150, max_requests_per_minute=rpm)
    most, _ = server.peak(WINDOW_S)
    assert most <= per_window(rpm) * TOLERANCE, (most, per_window(rpm))
    assert 150 / seconds <= rpm / 60 * TOLERANCE
    assert 150 / seconds >= rpm / 60 * 0.8  # the limit is used, not just respected
    # a 429 only where jitter put a request over the server's window edge (the limit allows
    # +1 in a window): retried, and rare
    assert sum(a.status == 429 for a in server.arrivals) <= 150 // 20


def test_tokens_per_minute_hold_at_the_server_and_are_corrected_by_usage() -> None:
    tpm = 30_000  # 500 tokens/s: ~25 requests/s of the ~20 tokens the server counts
    server = FakeOpenAI(window_s=WINDOW_S, tokens_per_window=per_window(tpm))
    _, seconds = run_limited(server, 100, max_tokens_per_minute=tpm)
    _, most = server.peak(WINDOW_S)
    assert most <= per_window(tpm) * TOLERANCE, (most, per_window(tpm))
    used = sum(a.tokens for a in server.arrivals if a.status == 200)
    booked = sum(estimated_tokens({"messages": p, "max_tokens": 16}) for p in prompts(100))
    assert booked > 1.4 * used  # the estimate alone would pace at ~2/3 of the limit:
    assert used / seconds >= tpm / 60 * 0.8, (used, seconds)  # the server's usage corrected it


def test_one_slow_request_in_32_keeps_the_limit_busy() -> None:
    """At 40 requests/s, one prompt in 32 answered 0.6 s late (10x): calls that overlap keep
    the slots full; one call at a time (the engine before request slots were shared across
    batches) waits for each batch's slow request."""
    rpm, n = 2400, 320

    def throughput(slow_at: int | None, calls: int) -> float:
        server = FakeOpenAI(latency_s=(0.04, 0.08), slow_s=0.6)
        with running(server):
            engine = engine_for(server, max_requests_per_minute=rpm)
            results, seconds = run_batches(engine, prompts(n, slow_at), 32, calls)
            engine.close()
        assert all(isinstance(r, Completion) for r in results)
        return n / seconds

    calls = OpenAIEngine.concurrent_calls(OpenAIEngineSpec(kind="openai", base_url="http://x",
                                                           model="m"))
    fast, slow = throughput(None, calls), throughput(20, calls)
    assert slow >= 0.9 * fast, (slow, fast)
    one_call_at_a_time = throughput(20, 1)
    assert one_call_at_a_time < 0.85 * fast, (one_call_at_a_time, fast)  # the test can fail


def test_cli_run_with_two_replicas_shares_the_limit_and_keeps_every_answer(
        tmp_path: Path) -> None:
    """`augment-ray run` on a private local Ray: refine over the 175 seed tasks on 2 replicas,
    each running several batches at once, under one 1800/min limit."""
    rpm = 1800
    source = ROOT / "jobs" / "data" / "self_instruct_seed"
    server = FakeOpenAI(latency_s=(0.05, 0.2), slow_s=1.0, window_s=WINDOW_S,
                        requests_per_window=per_window(rpm))
    output = tmp_path / "out"
    with running(server):
        job = {
            "name": "openai-limits", "input": {"uri": str(source)},
            "output": {"uri": str(output)},
            "engines": {"api": {
                "kind": "openai", "base_url": server.base_url, "model": "fake",
                "replicas": 2, "max_concurrency": 8, "batch_size": 8, "backoff_s": 0.05,
                "max_requests_per_minute": rpm, "sampling": {"max_tokens": 16},
            }},
            "steps": [{"kind": "refine", "engine": "api", "checks": False}],
        }
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job))
        env = {**os.environ, "RAY_ADDRESS": ""}  # a private local Ray, never a cluster
        done = subprocess.run([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    assert "Traceback" not in done.stdout + done.stderr

    rows = pq.read_table(source).to_pylist()
    kept = read_rows(output / "data")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows)
    assert not read_rows(output / "_rejects")
    for row in kept:  # each row got the answer to its own prompt, whatever batch it rode in
        asked = json.loads(server.answers[f"<refined>{row['refined_instruction']}</refined>"])
        assert any(row["instruction"] in message["content"] for message in asked)
    most, _ = server.peak(WINDOW_S)
    assert most <= per_window(rpm) * TOLERANCE, (most, per_window(rpm))
    # one pace for both replicas: each row answered once, a rare 429 at a window's edge
    assert sum(a.status == 200 for a in server.arrivals) == len(rows)
    assert sum(a.status == 429 for a in server.arrivals) <= len(rows) // 20
    assert server.most_in_flight <= 2 * 8
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_in"] == len(rows) and summary["rows_out"] == len(rows)


def read_rows(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
