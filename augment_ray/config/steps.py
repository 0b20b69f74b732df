"""The bases of every step kind's spec. Each kind declares its own subclass beside its Step
class (steps/<kind>.py, or tasks/<kind>.py for an LLM task) and registers both there."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from augment_ray.config.base import SamplingOverrides, Spec

STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StepSpec(Spec):
    # the fields that name an entry of the job's `engines`, with the role that engine must have
    # ("chat" or "embedding"; checked when the job is loaded)
    engine_fields: ClassVar[dict[str, str]] = {}

    kind: str
    name: str | None = Field(None, description="column prefix and report name; default: kind")
    max_reject_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="fail the run when this step rejects more than this share of its rows "
        "(default: reliability.max_reject_share)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not STEP_NAME.match(value):
            raise ValueError("must be lower-case letters, digits and _, starting with a letter")
        return value

    @property
    def step_name(self) -> str:
        return self.name or self.kind


class EngineStepSpec(StepSpec):
    """A step that runs a model from `engines`."""

    engine_fields: ClassVar[dict[str, str]] = {"engine": "chat"}

    engine: str = Field(description="name of an entry in `engines`")
    sampling: SamplingOverrides | None = Field(
        None, description="changes to the engine's sampling for this step")


class LLMStepSpec(EngineStepSpec):
    max_retries: int = Field(
        2, ge=0, le=10, description="new tries (with a new seed) for an unparsable answer"
    )
    reject_truncated: bool = Field(
        False, description="reject answers cut off by max_tokens instead of keeping them"
    )


class CheckedStepSpec(Spec):
    """A generating step whose answers are checked before they are kept (validate/checks.py);
    each kind declares its own `checks` field beside it."""

    engine_fields: ClassVar[dict[str, str]] = {"engine": "chat", "embedder": "embedding"}

    embedder: str | None = Field(
        None, description="an embedding engine of `engines` for the checks' cosines; default: "
        "the bundled all-MiniLM-L6-v2, loaded inside each of the step's actors")
    retry_invalid: bool = Field(
        False, description="generate again (as for an unparsable answer, up to max_retries) "
        "when a check rejects an answer, instead of rejecting the row at once")


class PAIStepSpec(LLMStepSpec):
    """A step with a published PAI augmentation model, driven natively or by our templates."""

    mode: Literal["auto", "native", "prompted"] = Field(
        "auto",
        description="native: the raw text is the only user message (the PAI models' format); "
        "prompted: the project's versioned template; auto: native when the model is a PAI one",
    )

    def is_native(self, model: str, native_model: Callable[[str], bool]) -> bool:
        """Whether to drive `model` natively: asked for, or `auto` and a published PAI model."""
        return self.mode == "native" or (self.mode == "auto" and native_model(model))


class TextColumnsSpec(StepSpec):
    """Base for curation steps that compare or score the text of some columns."""

    columns: list[str] = Field(
        default_factory=lambda: ["instruction", "input"],
        min_length=1,
        description="columns whose text is joined (nulls as empty) and compared",
    )


