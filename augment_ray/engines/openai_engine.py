"""Any OpenAI-compatible chat-completions server (vLLM, SGLang, DashScope, OpenAI) over HTTP.

One engine sends up to `max_concurrency` requests at once from one thread pool that every
generate() call shares, and its pool actors run several calls at once (`concurrent_calls`):
while one batch waits for its slowest request, the next batch's requests fill the free slots.
Requests/min and tokens/min limits are paced client-side, shared by every replica
(rate_limits.py). A request that keeps failing becomes that prompt's GenerationFailure; the API
key is read once from the named environment variable and never logged or returned.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator

from augment_ray.config.base import EngineSpec, SamplingParams
from augment_ray.engines.base import (
    Completion,
    Engine,
    GenerationFailure,
    Messages,
    Result,
    finish_reason,
    request_seeds,
)
from augment_ray.engines.rate_limits import Limiter, limiter_for
from augment_ray.errors import EngineError
from augment_ray.kinds import engine_kind
from augment_ray.names import check_env_var_name

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
MAX_DETAIL_CHARS = 300
JITTER = 0.1  # up to +10% of each delay, so concurrent retries do not hit the server in step
CONNECT_TIMEOUT_S = 10.0
# engine calls an actor runs at once: enough batches queued that a slow request's batch never
# leaves the request slots without work
CALLS_PER_ACTOR = 4
# a conservative prompt-token estimate for the tokens/min limit until the server's usage
# corrects it: a token is ~4 bytes of English, ~3 of CJK text (3 bytes a character)
BYTES_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 4



class OpenAIEngineSpec(EngineSpec):
    """Any OpenAI-compatible chat-completions server (vLLM, SGLang, DashScope, OpenAI)."""

    kind: Literal["openai"]
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the server knows")
    api_key_env: str | None = Field(
        None, description="NAME of the env var that holds the API key (never the key itself)"
    )
    max_concurrency: int = Field(
        8, gt=0, description="requests in flight per actor, kept full across batches")
    max_requests_per_minute: int | None = Field(
        None, gt=0, description="client-side limit shared by all replicas of the pool "
        "(and by every pool of the run on the same base_url, model and key)")
    max_tokens_per_minute: int | None = Field(
        None, gt=0, description="client-side limit of prompt + completion tokens, shared like "
        "max_requests_per_minute; a request books its prompt estimate + max_tokens, corrected "
        "by the server's usage")
    max_retries: int = Field(5, ge=0, description="retries of a request on 429/5xx/timeouts")
    backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(30.0, gt=0, description="longest retry delay")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    replicas: int = Field(1, gt=0, description="actors sending requests")
    batch_size: int = Field(32, gt=0, description="rows per actor call")
    num_cpus: float = Field(
        0.25, gt=0, description="CPUs Ray reserves per actor (it waits on HTTP)"
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="provider-specific request fields, sent as given"
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="default sampling of the steps using it")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        return check_env_var_name(value)

    @property
    def num_gpus(self) -> float:
        return 0.0


@engine_kind(OpenAIEngineSpec)
class OpenAIEngine(Engine):
    @classmethod
    def prepare(cls, spec: Any) -> None:
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise EngineError(
                f"engine {spec.model!r} reads its API key from ${spec.api_key_env}, which is not "
                "set (export it, or pass it by name: augment-ray submit --env NAME)"
            )

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"base_url": spec.base_url}

    @classmethod
    def concurrent_calls(cls, spec: Any) -> int:
        return CALLS_PER_ACTOR

    def __init__(self, spec: OpenAIEngineSpec) -> None:
        self.spec = spec
        self.model_name = spec.model
        self.url = f"{spec.base_url}/chat/completions"
        self._api_key = _read_api_key(spec.api_key_env)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(spec.timeout_s, connect=min(spec.timeout_s, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(max_connections=spec.max_concurrency),
        )
        # the request slots of every generate() call, so concurrent calls share them
        self._slots = ThreadPoolExecutor(max_workers=spec.max_concurrency,
                                         thread_name_prefix="openai-engine")
        self._limiter: Limiter | None = limiter_for(
            f"{spec.base_url}\x1f{spec.model}\x1f{spec.api_key_env}",
            spec.max_requests_per_minute, spec.max_tokens_per_minute)

    def close(self) -> None:
        self._slots.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Result]:
        bodies = self._request_bodies(prompts, sampling)
        futures = [self._slots.submit(self._answer, body) for body in bodies]
        return [future.result() for future in futures]

    def _request_bodies(self, prompts: list[Messages], sampling: SamplingParams
                        ) -> list[dict[str, Any]]:
        base: dict[str, Any] = {
            "model": self.spec.model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.logprobs is not None:
            base.update(logprobs=True, top_logprobs=sampling.logprobs)
        if sampling.json_schema is not None:
            base["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json.loads(sampling.json_schema)},
            }
        # per-request seeds as the vLLM engine derives them: the n-th copy of a prompt (expand's
        # n, a retried row) must sample anew, and batching must not matter
        return [{**base, "messages": messages, "seed": seed, **self.spec.extra_body}
                for messages, seed in zip(prompts, request_seeds(prompts, sampling.seed),
                                          strict=True)]

    def _answer(self, body: dict[str, Any]) -> Result:
        try:
            return self._post_with_retries(body)
        except Exception as error:  # a bug or odd input must cost one row, not the batch
            detail = self._scrub(f"{type(error).__name__}: {error}")[:MAX_DETAIL_CHARS]
            log.warning("request failed unexpectedly: %s", detail)
            return GenerationFailure("api_error", detail)

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        """One POST, after the rate limits allow it (every attempt counts at the server)."""
        limiter = self._limiter
        if limiter is None:
            return self._client.post(self.url, json=body)
        booked = estimated_tokens(body)
        limiter.acquire(booked)
        used = booked
        try:
            response = self._client.post(self.url, json=body)
            if response.status_code == 200:
                used = _used_tokens(response, booked)
            return response
        finally:
            limiter.settle(booked, used)

    def _post_with_retries(self, body: dict[str, Any]) -> Result:
        attempts = self.spec.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._post(body)
            except httpx.TransportError as error:  # connect errors, timeouts, dropped links
                problem, retry_after = f"{type(error).__name__}: {error}", None
            else:
                if response.status_code == 200:
                    return self._parse(response, body["max_tokens"])
                problem = f"{response.status_code} {response.text}"
                if not _retryable(response.status_code):
                    return self._failure(problem)
                retry_after = _retry_after_s(response)
            if attempt == attempts:
                return self._failure(problem)
            delay = self._delay(attempt, retry_after)
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.2fs", self.url, attempt, attempts,
                self._scrub(problem.split("\n", 1)[0])[:80], delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns on its last attempt

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            delay = min(retry_after, self.spec.max_backoff_s)
        else:
            delay = min(self.spec.backoff_s * 2 ** (attempt - 1), self.spec.max_backoff_s)
        return delay * (1 + random.uniform(0, JITTER))

    def _parse(self, response: httpx.Response, max_tokens: int) -> Result:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                return self._failure(f"200 answer without text content: {response.text}")
            usage = payload.get("usage") or {}
            completion_tokens = int(usage.get("completion_tokens") or 0)
            return Completion(
                text=text.strip(),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=completion_tokens,
                finish_reason=finish_reason(completion_tokens, max_tokens,
                                            choice.get("finish_reason")),
                logprobs=_top_logprobs(choice.get("logprobs")),
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return self._failure(f"200 unreadable response: {response.text}")

    def _failure(self, problem: str) -> GenerationFailure:
        return GenerationFailure("api_error", self._scrub(problem)[:MAX_DETAIL_CHARS])

    def _scrub(self, text: str) -> str:
        """A server may echo the request's headers in an error body."""
        return text.replace(self._api_key, "***") if self._api_key else text


def _read_api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise EngineError(
            f"The openai engine's api_key_env names the environment variable {env_name}, "
            "which is not set or empty: export the API key in it."
        )
    return key


def estimated_tokens(body: dict[str, Any]) -> int:
    """What a request may cost against tokens/min before the server says: its prompt
    (over-)estimated from its bytes, plus every token it may generate."""
    prompt = sum(len(str(m.get("content", "")).encode()) // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE
                 for m in body["messages"])
    return prompt + int(body["max_tokens"])


def _used_tokens(response: httpx.Response, booked: int) -> int:
    """Prompt + completion tokens the server counted (its usage), else what was booked."""
    try:
        usage = response.json().get("usage") or {}
        used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    except (ValueError, TypeError, AttributeError):
        return booked
    return used or booked


def _retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def _retry_after_s(response: httpx.Response) -> float | None:
    """A numeric Retry-After header in seconds (the HTTP-date form is ignored)."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _top_logprobs(logprobs: dict[str, Any] | None) -> tuple[dict[str, float], ...] | None:
    """OpenAI's choices[0].logprobs.content[i].top_logprobs[j] as {token text: logprob} per
    step; tokens that share a text keep the larger value."""
    if not logprobs or logprobs.get("content") is None:
        return None
    steps = []
    for step in logprobs["content"]:
        top: dict[str, float] = {}
        for item in step.get("top_logprobs") or ():
            token, value = item["token"], float(item["logprob"])
            top[token] = max(value, top.get(token, float("-inf")))
        steps.append(top)
    return tuple(steps)
