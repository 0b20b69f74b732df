"""The building blocks every part of a job spec uses: the strict base model, object-store
options, sampling parameters, text folding options and the base of every engine kind's spec."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from augment_ray.names import check_env_var_name


class Spec(BaseModel):
    """Base for every job-spec model: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageOptions(Spec):
    """How to reach an object store. Secrets are never written here, only the names of the
    environment variables that hold them; with none given, the standard AWS chain is used
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles)."""

    endpoint: str | None = Field(
        None, description="e.g. http://127.0.0.1:9000 or oss-cn-hangzhou.aliyuncs.com"
    )
    region: str | None = Field(None, description="e.g. us-west-2, cn-hangzhou")
    addressing: Literal["auto", "path", "virtual"] = Field(
        "auto", description="auto: virtual-hosted for oss://, path-style otherwise"
    )
    access_key_id_env: str | None = Field(
        None, description="NAME of the env var holding the access key id")
    secret_access_key_env: str | None = Field(
        None, description="NAME of the env var holding the secret key")
    session_token_env: str | None = Field(
        None, description="NAME of the env var holding a session token")
    anonymous: bool = Field(False, description="unsigned requests (public buckets)")
    # exclude: how hard to retry is not what the job computes, so these stay out of the job
    # digest (a rerun with other retry settings resumes the same run)
    max_attempts: int = Field(
        10, ge=1, le=100, exclude=True,
        description="tries per request, the first included, before a read, write, listing or "
        "commit step fails (503 SlowDown, 500, resets, timeouts are retried with backoff)")
    retry_mode: Literal["standard", "legacy"] = Field(
        "standard", exclude=True,
        description="the AWS SDKs' retry mode: standard (a retry quota that shrinks while "
        "requests keep failing) or legacy (no quota)")
    connect_timeout_s: float = Field(
        10.0, gt=0, exclude=True, description="seconds to open a connection before retrying")
    request_timeout_s: float = Field(
        30.0, gt=0, exclude=True,
        description="seconds a request may wait for the next byte before it is retried")

    @field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")
    @classmethod
    def _env_var_name(cls, value: str | None) -> str | None:
        return check_env_var_name(value)


class SamplingParams(Spec):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(256, gt=0, description="most tokens generated per answer")
    seed: int = Field(0, description="sampling seed; each request derives its own from it")
    logprobs: int | None = Field(
        None, ge=0, le=20,
        description="return this many most likely tokens (with log-probabilities) for every "
        "generated token, as vLLM's `logprobs` and OpenAI's `top_logprobs` do; judge steps set it",
    )
    json_schema: str | None = Field(
        None,
        description="constrain the answer to this JSON schema (vLLM guided decoding, OpenAI "
        "response_format); a mapping in YAML. The transformers engine does not constrain: "
        "parsers still check every answer",
    )

    @field_validator("json_schema", mode="before")
    @classmethod
    def _json_schema(cls, value: Any) -> str | None:
        # stored as canonical JSON text so sampling stays hashable (engines group by it)
        if value is None:
            return None
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError("must be a JSON schema mapping")
        return json.dumps(value, sort_keys=True)

    def merged(self, overrides: SamplingOverrides | None) -> SamplingParams:
        if overrides is None:
            return self
        # validated again: an override's json_schema mapping becomes canonical text
        return SamplingParams.model_validate(
            {**self.model_dump(), **overrides.model_dump(exclude_none=True)}
        )


class SamplingOverrides(Spec):
    """A step's changes to its engine's sampling; unset fields keep the engine's value."""

    temperature: float | None = Field(None, ge=0.0, description="see the engine's sampling")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="see the engine's sampling")
    max_tokens: int | None = Field(None, gt=0, description="see the engine's sampling")
    seed: int | None = Field(None, description="see the engine's sampling")
    logprobs: int | None = Field(None, ge=0, le=20, description="see the engine's sampling")
    json_schema: str | dict[str, Any] | None = Field(
        None, description="see the engine's sampling")


class NormalizeSpec(Spec):
    """How text is folded before it is compared."""

    unicode: Literal["NFKC", "NFC", "none"] = Field(
        "NFKC", description="Unicode normalization form applied first")
    case: bool = Field(True, description="fold case")
    whitespace: bool = Field(True, description="collapse runs of whitespace, trim the ends")


class EngineSpec(Spec):
    """What every engine kind's spec has; each kind declares its subclass beside its engine
    (engines/<kind>_engine.py) and registers both there."""

    # Every kind declares `kind` (a one-value Literal), `model`, `replicas`, `num_cpus`,
    # `num_gpus` (a field or a property) and, a chat engine, `sampling: SamplingParams`, in its
    # own field order (the docs list them in that order), so none are declared here.

    # what the engine does: "chat" (answers prompts) or "embedding" (turns texts into vectors);
    # a step's engine fields name the role they need
    role: ClassVar[str] = "chat"

    # the one field every kind shares as is, declared once (the docs list it last)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each replica needs besides its CPUs/GPUs, e.g. "
        "{llm_node: 1} to place the pool on nodes started with --resources='{\"llm_node\": 1}'")
    # exclude: one pool or one per step computes the same answers (each step keeps its journal),
    # so this stays out of the job digest
    share: bool = Field(
        True, exclude=True,
        description="steps that name this engine one after another run in one pool: each "
        "replica loads the model once and passes every batch through those steps in order; "
        "false: a pool (and a model copy per replica) for each step")

    @property
    def uses_ray_data_llm(self) -> bool:
        """Whether single-call steps stream through ray.data.llm's processor (vllm only)."""
        return False

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) actors of the pool; equal for a fixed-size pool."""
        replicas = getattr(self, "replicas", 1)
        return (replicas, replicas) if isinstance(replicas, int) else (replicas[0], replicas[1])
