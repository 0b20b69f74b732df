"""The engine contract every backend implements, and what all backends share.

An engine kind is declared in its own module: its spec (a subclass of config.base.EngineSpec)
and its Engine subclass, registered with @engine_kind(Spec). The classmethods below are the
driver-side part of a kind (checks before the run, what the summary says about it, the CPUs its
pool holds); __init__ and generate() run inside the pool's actors.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from augment_ray.config.base import EngineSpec, SamplingParams
from augment_ray.engines.model_files import model_display_name

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


Result = Completion | GenerationFailure


class Engine:
    """A model that answers chat prompts. Subclasses set `model_name` and implement
    generate(); the registry sets `kind` and `spec_class`."""

    kind: ClassVar[str]
    spec_class: ClassVar[type[EngineSpec]]
    model_name: str

    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Result]:
        """One result per prompt, in order. Never raises for a single bad prompt."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, spec: Any) -> None:
        """Driver-side checks and one-time work before the run (fail fast, clearly)."""

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        """What the run summary records about an engine of this kind besides the basics."""
        return {}

    @classmethod
    def concurrent_calls(cls, spec: Any) -> int:
        """generate() calls one pool actor runs at once (Ray Data batches); more than 1 only
        for engines whose calls mostly wait (HTTP) and are thread-safe."""
        return 1

    @classmethod
    def pool_cpus(cls, spec: Any) -> float:
        """CPUs a pool of this engine holds at its largest."""
        return spec.replica_range[1] * spec.num_cpus


def engine_class(spec: EngineSpec) -> type[Engine]:
    from augment_ray.kinds import engine_kinds

    return engine_kinds()[spec.kind]


def build_engine(spec: EngineSpec) -> Engine:
    """The engine `spec` describes, loaded (call it where the model should live: an actor)."""
    return engine_class(spec)(spec)


def describe_engine(name: str, spec: EngineSpec) -> dict[str, Any]:
    return {"engine": name, "engine_kind": spec.kind, "model": model_display_name(spec.model),
            "replicas": spec.replicas, **engine_class(spec).describe(spec)}


def messages_json(messages: Messages) -> str:
    """The canonical text of a prompt: what request seeds and journal keys are derived from."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def numbered_copies(prompts: Sequence[Messages]) -> list[tuple[str, int]]:
    """(canonical text, which copy of that prompt in the call) per prompt: the n-th copy of one
    prompt (an expansion's n, a consistency sample) must sample anew and be journaled apart."""
    seen: Counter[str] = Counter()
    numbered = []
    for messages in prompts:
        text = messages_json(messages)
        numbered.append((text, seen[text]))
        seen[text] += 1
    return numbered


def request_seed(seed: int, messages_json: str, salt: str) -> int:
    """vLLM seeds each request on its own: identical prompts with one seed give identical
    answers. A seed from (job seed, prompt, salt) keeps runs reproducible whatever the
    batching, and makes the n-th copy of a prompt (expand's n, a retried row) sample anew."""
    digest = hashlib.blake2b(f"{seed}\x1f{messages_json}\x1f{salt}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


def request_seeds(prompts: Sequence[Messages], seed: int) -> list[int]:
    """One seed per prompt of an engine call (see request_seed and numbered_copies)."""
    return [request_seed(seed, text, str(copy)) for text, copy in numbered_copies(prompts)]


def finish_reason(completion_tokens: int, max_tokens: int, reported: str | None = None) -> str:
    """'length' when the answer was cut off by max_tokens, else 'stop'; a server's own
    finish_reason wins when it gives one."""
    if reported:
        return "length" if reported == "length" else "stop"
    return "length" if completion_tokens >= max_tokens else "stop"
