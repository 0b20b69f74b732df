"""Job spec steps -> Step objects."""

from __future__ import annotations

from augment_ray.config import (
    AutoCorrectStepSpec,
    AutoFilterStepSpec,
    ClassifyTaskStepSpec,
    DecontaminateStepSpec,
    DedupExactStepSpec,
    DedupNearStepSpec,
    ExpandStepSpec,
    FilterStepSpec,
    JobSpec,
    LLMStepSpec,
    PairExpandStepSpec,
    PAIStepSpec,
    RefineStepSpec,
    ResampleStepSpec,
    RespondStepSpec,
    ScoreStepSpec,
    StepSpec,
)
from augment_ray.errors import JobSpecError
from augment_ray.steps.auto_correct import AutoCorrectStep
from augment_ray.steps.auto_filter import AutoFilterStep
from augment_ray.steps.base import Step
from augment_ray.steps.decontaminate import DecontaminateStep
from augment_ray.steps.dedup import DedupExactStep, DedupNearStep
from augment_ray.steps.filter import RESPONSE_WRITERS, FilterStep
from augment_ray.steps.llm import LLMStep, RunOptions
from augment_ray.steps.resample import ResampleStep
from augment_ray.steps.score import ScoreStep
from augment_ray.tasks.base import LLMTask
from augment_ray.tasks.classify import ClassifyTask
from augment_ray.tasks.expand import ExpandTask, is_native_expand_model
from augment_ray.tasks.pair_expand import PairExpandTask, is_native_pair_model
from augment_ray.tasks.refine import RefineTask, is_native_refine_model
from augment_ray.tasks.respond import RespondTask


def _native(spec: PAIStepSpec, model: str, detect) -> bool:
    return spec.mode == "native" or (spec.mode == "auto" and detect(model))


def _task(spec: StepSpec, job: JobSpec) -> LLMTask:
    model = job.engines[spec.engine].model if isinstance(spec, LLMStepSpec) else ""
    if isinstance(spec, RefineStepSpec):
        return RefineTask(_native(spec, model, is_native_refine_model), spec.output_column)
    if isinstance(spec, ExpandStepSpec):
        native = _native(spec, model, is_native_expand_model)
        if native and spec.few_shot:
            raise JobSpecError(
                f"Step {spec.step_name!r}: few_shot needs mode: prompted; the native Instruct-Exp "
                "models take exactly one instruction."
            )
        seed = job.engines[spec.engine].sampling.merged(spec.sampling).seed
        return ExpandTask(native, spec.n, spec.few_shot, seed)
    if isinstance(spec, PairExpandStepSpec):
        seed = job.engines[spec.engine].sampling.merged(spec.sampling).seed
        return PairExpandTask(_native(spec, model, is_native_pair_model), spec.k, spec.n, seed)
    if isinstance(spec, ClassifyTaskStepSpec):
        return ClassifyTask(spec.category_column, spec.language_column)
    if isinstance(spec, RespondStepSpec):
        return RespondTask(spec.instruction_column, f"{spec.step_name}_previous_output")
    raise ValueError(f"no builder for step kind {spec.kind!r}")


def _steps_before(spec: StepSpec, job: JobSpec) -> list[StepSpec]:
    for index, step in enumerate(job.steps):
        if step is spec:
            return list(job.steps[:index])
    return list(job.steps)


def build_step(spec: StepSpec, job: JobSpec) -> Step:
    if isinstance(spec, ResampleStepSpec):
        return ResampleStep(spec.step_name, spec.by, spec.targets, spec.seed)
    if isinstance(spec, FilterStepSpec):
        writes_response = any(s.kind in RESPONSE_WRITERS for s in _steps_before(spec, job))
        return FilterStep(spec, job.input, response_written_before=writes_response)
    if isinstance(spec, DecontaminateStepSpec):
        return DecontaminateStep(spec)
    if isinstance(spec, DedupExactStepSpec):
        return DedupExactStep(spec)
    if isinstance(spec, DedupNearStepSpec):
        return DedupNearStep(spec)
    if isinstance(spec, AutoFilterStepSpec):
        return AutoFilterStep(spec)
    if isinstance(spec, ScoreStepSpec):
        engine = job.engines[spec.engine]
        return ScoreStep(spec, spec.engine, engine, engine.sampling.merged(spec.sampling))
    if isinstance(spec, AutoCorrectStepSpec):
        engine = job.engines[spec.engine]
        return AutoCorrectStep(spec, engine, job.engines[spec.judge or spec.engine],
                               engine.sampling.merged(spec.sampling))
    if not isinstance(spec, LLMStepSpec):
        raise ValueError(f"no builder for step kind {spec.kind!r}")
    engine = job.engines[spec.engine]
    sampling = engine.sampling.merged(spec.sampling)
    n = getattr(spec, "n", 1)
    if n > 1 and sampling.temperature == 0:
        raise JobSpecError(
            f"Step {spec.step_name!r}: n: {n} with temperature 0 would give {n} copies "
            "of one answer; set steps[].sampling.temperature (e.g. 0.8)."
        )
    return LLMStep(
        name=spec.step_name,
        kind=spec.kind,
        engine_name=spec.engine,
        engine_spec=engine,
        task=_task(spec, job),
        sampling=sampling,
        options=RunOptions(
            max_retries=spec.max_retries,
            reject_truncated=spec.reject_truncated,
            keep_seeds=getattr(spec, "keep_seeds", True),
        ),
    )


def build_steps(job: JobSpec) -> list[Step]:
    return [build_step(spec, job) for spec in job.steps]
