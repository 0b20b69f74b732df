"""The whole job: input, output, engines and steps. The step and engine unions are built from
the kinds registered in augment_ray.kinds, so a new kind needs no edit here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, ValidationError, model_validator

from augment_ray.config.base import Spec
from augment_ray.config.dates import read_job_yaml
from augment_ray.config.io import InputSpec, OutputSpec
from augment_ray.errors import JobSpecError
from augment_ray.kinds import engine_kinds, engine_spec_union, step_kinds, step_spec_union

AnyEngineSpec = engine_spec_union()
AnyStepSpec = step_spec_union()


class ReliabilitySpec(Spec):
    """How a run protects itself against crashes and bad data."""

    resume: bool = Field(
        True, description="journal every model answer under <output>/_work/ so a rerun after a "
        "crash replays them instead of generating them again (deleted on commit)")
    max_actor_restarts: int = Field(
        3, ge=0, description="times one engine actor may die (and its batch be retried) before "
        "the run fails")
    max_reject_share: float = Field(
        0.9, ge=0.0, le=1.0, description="a step that rejects more than this share of the rows "
        "it gets fails the run (nothing is committed); a step's own max_reject_share overrides it")
    # exclude: how long a dead run's lease blocks a rerun is not what the job computes
    lease_timeout_s: float = Field(
        120.0, gt=0, exclude=True, description="a run holds a lease on its output and renews it "
        "every quarter of this; another run of the same output is refused while the lease is "
        "fresh and takes it over once it has not been renewed for this long (at once when its "
        "holder ran on the same host and its process is gone)")


class ReportSpec(Spec):
    """What the run measures for its summary and report, beside the rows (no effect on them)."""

    diversity_sample: int = Field(
        256, ge=0, description="texts per side (a generating step's inputs, its kept outputs) "
        "embedded on the driver after the write for the summary's diversity figures (mean "
        "pairwise cosine distance, Vendi score); a seeded sample; 0 turns it off")


class JobSpec(Spec):
    name: str = Field("augment", description="a short name for logs and submission ids")
    input: InputSpec
    output: OutputSpec
    reliability: ReliabilitySpec = Field(default_factory=ReliabilitySpec)
    # exclude: not part of the job digest (what the job computes), so changing it neither makes
    # a committed date "another job" nor stops an unfinished attempt from resuming
    report: ReportSpec = Field(
        default_factory=ReportSpec, exclude=True,
        description="summary and report measurements (not part of the job digest)")
    engines: dict[str, AnyEngineSpec] = Field(default_factory=dict)
    steps: list[AnyStepSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> JobSpec:
        names: set[str] = set()
        for index, step in enumerate(self.steps):
            if step.step_name in names:
                raise ValueError(
                    f"steps[{index}]: step name {step.step_name!r} is used twice; "
                    "give one of them a distinct `name`"
                )
            names.add(step.step_name)
            for field_name, role in step.engine_fields.items():
                check_engine_reference(f"steps[{index}].{field_name}",
                                       getattr(step, field_name), self.engines, role)
        return self


def check_engine_reference(where: str, name: str | None, engines: dict[str, Any],
                           role: str = "chat") -> None:
    """A ValueError (reported against the job) when `name` is not one of `engines`, or is an
    engine of another role (an embedding model named where a chat model must answer)."""
    if name is None:
        return
    if name not in engines:
        known = ", ".join(sorted(engines)) or "none are defined"
        raise ValueError(f"{where}: {name!r} is not an engine defined in `engines` ({known})")
    if engines[name].role != role:
        fitting = ", ".join(sorted(n for n, e in engines.items() if e.role == role))
        raise ValueError(
            f"{where}: engine {name!r} is {_a(engines[name].role)} engine (kind "
            f"{engines[name].kind}); this needs {_a(role)} engine"
            + (f" ({fitting})" if fitting else ""))


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        # discriminated unions add the tag to the location (steps.0.refine.engine); drop it
        in_engines = bool(item["loc"]) and item["loc"][0] == "engines"
        tags = set(engine_kinds() if in_engines else step_kinds())
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p in tags))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; secrets belong in env vars, not here)"
        elif item["type"] == "union_tag_invalid":
            what = "engine" if in_engines else "step"
            message = f"unknown {what} kind; expected one of: {', '.join(sorted(tags))}"
        elif item["type"] == "union_tag_not_found":
            message = "each step needs a `kind`"
        problems.append(f"{_location(loc)}: {message}")
    return f"{source} is not a valid job: " + "; ".join(problems) + "."


SpecT = TypeVar("SpecT", bound=Spec)


def validate_spec(model: type[SpecT], data: Any, source: str) -> SpecT:
    """`data` (parsed YAML) as `model`, or a JobSpecError naming every bad field."""
    if not isinstance(data, dict):
        raise JobSpecError(f"{source} is not a valid job: expected a mapping of keys at the top.")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(format_validation_error(source, error)) from None


def parse_job(data: Any, source: str = "job") -> JobSpec:
    return validate_spec(JobSpec, data, source)


def load_job(path: str | Path, ds: str | None = None) -> JobSpec:
    return parse_job(read_job_yaml(path, ds), source=str(path))


