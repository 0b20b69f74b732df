"""Job spec steps -> Step objects."""

from __future__ import annotations

from augment_ray.config import JobSpec, RefineStepSpec, StepSpec
from augment_ray.steps.base import Step
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.refine import RefineTask, is_native_refine_model


def build_step(spec: StepSpec, job: JobSpec) -> Step:
    if isinstance(spec, RefineStepSpec):
        engine = job.engines[spec.engine]
        native = spec.mode == "native" or (
            spec.mode == "auto" and is_native_refine_model(engine.model)
        )
        return LLMStep(
            name=spec.step_name,
            kind=spec.kind,
            engine_name=spec.engine,
            engine_spec=engine,
            task=RefineTask(native=native, output_column=spec.output_column),
            sampling=engine.sampling.merged(spec.sampling),
        )
    raise ValueError(f"no builder for step kind {spec.kind!r}")


def build_steps(job: JobSpec) -> list[Step]:
    return [build_step(spec, job) for spec in job.steps]
