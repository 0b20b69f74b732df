"""The step contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import ray.data

if TYPE_CHECKING:
    from augment_ray.config.base import EngineSpec
    from augment_ray.config.job import JobSpec
    from augment_ray.config.steps import StepSpec
    from augment_ray.io.journal import GenerationJournal
    from augment_ray.steps.engine_pool import PoolCall
    from augment_ray.storage import Location


@dataclass(frozen=True)
class RunContext:
    """What the pipeline tells steps about the run: where engine pools journal their answers
    (None: no journal) and how often an engine actor may die before the run fails."""

    run_id: str
    work: Location | None
    max_actor_restarts: int = 3


class Step(ABC):
    """One stage of work on rows. A step never drops a row: it rejects it (see rows.reject), and
    it passes rows an earlier step rejected through unchanged.

    A step kind is a subclass registered with @step_kind(Spec) in the module that declares its
    Spec (see augment_ray.kinds); facts about the kind are class attributes here."""

    kind: ClassVar[str]
    spec_class: ClassVar[type[StepSpec]]
    # rows this kind passes on carry a response (`output`) it wrote
    writes_response: ClassVar[bool] = False
    name: str
    context: RunContext | None = None  # set by the pipeline before apply()
    # the steps whose calls run in one pool with this one's (steps/shared_engine.py), if any
    pool_shared_by: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Any, job: JobSpec) -> Step:
        """The step for one entry of the job's `steps` (most kinds need only their spec)."""
        return cls(spec)

    @abstractmethod
    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset: ...

    def pool_engine(self) -> tuple[str, EngineSpec] | None:
        """(engine name, spec) when this step's work is one call on that engine's pool and
        nothing more (pool_call): steps on one engine in a row then share a pool. None for
        every other step."""
        return None

    def pool_call(self) -> PoolCall:
        """This step's call on its engine's pool, for a step with a pool_engine()."""
        raise NotImplementedError(f"step kind {self.kind!r} has no pool call")

    def prepare(self) -> None:  # noqa: B027 - optional hook, most steps need nothing here
        """Driver-side checks and one-time work before the run starts (e.g. find the model)."""

    def output_columns(self) -> list[str]:
        """Columns this step adds to rows."""
        return []

    def cpu_request(self) -> float:
        """CPUs this step's actors hold for the whole run (0 for plain tasks)."""
        return 0.0

    def journal(self, role: str = "") -> GenerationJournal | None:
        """The journal of this step's engine pool (`role` tells a step's second pool apart)."""
        if self.context is None or self.context.work is None:
            return None
        from augment_ray.io.journal import GenerationJournal

        pool = f"{self.name}.{role}" if role else self.name
        return GenerationJournal.open(self.context.work, pool, self.context.run_id)

    def pool_options(self, role: str = "") -> dict[str, Any]:
        """Keyword arguments of map_with_engine_pool that come from the run."""
        restarts = self.context.max_actor_restarts if self.context else 3
        return {"journal": self.journal(role), "max_restarts": restarts}

    def describe(self) -> dict[str, Any]:
        """What the run summary says about this step besides its counts. A `note` entry (a few
        words: a threshold, what was skipped) is printed on the step's summary line."""
        shared = {"pool_shared_by": list(self.pool_shared_by)} if self.pool_shared_by else {}
        return {"name": self.name, "kind": self.kind, **shared}
