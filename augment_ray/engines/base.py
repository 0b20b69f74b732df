"""The engine protocol every backend implements."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from augment_ray.config import EngineSpec, SamplingParams

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (hit max_tokens)
    # with sampling.logprobs = k: per generated token, its k most likely alternatives as
    # {decoded token text: log-probability} (vLLM's and OpenAI's top logprobs have this shape)
    logprobs: tuple[dict[str, float], ...] | None = None


@dataclass(frozen=True)
class GenerationFailure:
    """A prompt the engine could not answer; the row is rejected with this reason."""

    reason: str
    detail: str = ""


class Engine(Protocol):
    model_name: str

    def generate(
        self, prompts: list[Messages], sampling: SamplingParams
    ) -> list[Completion | GenerationFailure]:
        """One result per prompt, in order. Never raises for a single bad prompt."""
        ...


def request_seed(seed: int, messages_json: str, salt: str) -> int:
    """vLLM seeds each request on its own: identical prompts with one seed give identical
    answers. A seed from (job seed, prompt, salt) keeps runs reproducible whatever the
    batching, and makes the n-th copy of a prompt (expand's n, a retried row) sample anew."""
    digest = hashlib.blake2b(f"{seed}\x1f{messages_json}\x1f{salt}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def build_engine(spec: EngineSpec) -> Engine:
    if spec.kind == "transformers":
        from augment_ray.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec)
    if spec.kind == "vllm":
        from augment_ray.engines.vllm_engine import VllmEngine

        return VllmEngine(spec)
    if spec.kind == "openai":
        from augment_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(spec)
    raise ValueError(f"unknown engine kind {spec.kind!r}")
