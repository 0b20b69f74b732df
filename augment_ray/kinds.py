"""The registry of step kinds and engine kinds.

A kind is declared once, in its own module, by decorating its class:

    @step_kind(DedupExactStepSpec)        # steps/dedup.py: spec, Step class, registration
    class DedupExactStep(Step): ...

    @engine_kind(OpenAIEngineSpec)        # engines/openai_engine.py
    class OpenAIEngine(Engine): ...

The kind string is the spec's `kind` Literal. The job spec's unions (config/job.py), the error
messages that list the kinds, the docs tables (docs/STEPS.md, docs/ENGINES.md) and the tests
that check every kind has docs and an example job are all built from this registry. Modules are
found by walking the packages below, so adding a module is all it takes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, Union, get_args

from pydantic import Discriminator, Field, Tag

if TYPE_CHECKING:
    from pydantic import BaseModel

# packages whose modules declare step kinds (LLM tasks live in tasks/, other steps in steps/)
STEP_PACKAGES = ("augment_ray.steps", "augment_ray.tasks")
ENGINE_PACKAGES = ("augment_ray.engines",)
# the engine kind of an `engines` entry that leaves out `kind`
DEFAULT_ENGINE_KIND = "transformers"

T = TypeVar("T", bound=type)

_steps: dict[str, type] = {}
_engines: dict[str, type] = {}


def kind_of(spec: type[BaseModel]) -> str:
    """The kind string of a spec class: the one value of its `kind: Literal[...]` field."""
    values = get_args(spec.model_fields["kind"].annotation)
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{spec.__name__}.kind must be a Literal of one string")
    return values[0]


def _register(table: dict[str, type], what: str, spec: type[BaseModel]) -> Callable[[T], T]:
    def register(cls: T) -> T:
        kind = kind_of(spec)
        known = table.get(kind)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"{what} kind {kind!r} is registered twice: {known} and {cls}")
        cls.kind = kind
        cls.spec_class = spec
        table[kind] = cls
        return cls

    return register


def step_kind(spec: type[BaseModel]) -> Callable[[T], T]:
    """Class decorator: `cls` (a Step with a `from_spec(spec, job)` classmethod) runs the step
    kind that `spec` describes."""
    return _register(_steps, "step", spec)


def engine_kind(spec: type[BaseModel]) -> Callable[[T], T]:
    """Class decorator: `cls` (an Engine) runs the engine kind that `spec` describes."""
    return _register(_engines, "engine", spec)


def _import_all(packages: tuple[str, ...]) -> None:
    for package_name in packages:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")


@cache
def step_kinds() -> dict[str, Any]:
    """kind -> Step class, for every step kind in STEP_PACKAGES."""
    _import_all(STEP_PACKAGES)
    return dict(sorted(_steps.items()))


@cache
def engine_kinds() -> dict[str, Any]:
    """kind -> Engine class, for every engine kind in ENGINE_PACKAGES."""
    _import_all(ENGINE_PACKAGES)
    return dict(sorted(_engines.items()))


def step_spec_union() -> Any:
    """The pydantic type of one entry of a job's `steps`: the registered specs, told apart by
    `kind`."""
    specs = tuple(cls.spec_class for cls in step_kinds().values())
    return Annotated[Union[specs], Field(discriminator="kind")]  # noqa: UP007 - built at run time


def _engine_kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("kind", DEFAULT_ENGINE_KIND)
    return getattr(value, "kind", DEFAULT_ENGINE_KIND)


def engine_spec_union() -> Any:
    """The pydantic type of one entry of a job's `engines` (`kind` may be left out)."""
    tagged = tuple(Annotated[cls.spec_class, Tag(kind)] for kind, cls in engine_kinds().items())
    return Annotated[Union[tagged], Discriminator(_engine_kind_of)]  # noqa: UP007


def build_steps(job: Any) -> list[Any]:
    """The job's steps, in order, each built by its kind's Step class."""
    kinds = step_kinds()
    return [kinds[spec.kind].from_spec(spec, job) for spec in job.steps]
