"""An LLMTaskRunner around a scripted engine: everything but the model load is real."""

from __future__ import annotations

from typing import Any

from augment_ray.config.base import SamplingParams
from augment_ray.steps.generation import GenerationRows, RunOptions
from augment_ray.steps.llm import LLMTaskRunner


def runner(task: Any, engine: Any, step: str = "s", **options: Any) -> LLMTaskRunner:
    built = object.__new__(LLMTaskRunner)  # skip loading a model
    built.step, built.task = step, task
    built.options = RunOptions(**options)
    built.engine = engine
    built.out = GenerationRows(step, "e", "scripted", task,
                               SamplingParams(temperature=0.0, max_tokens=8))
    return built
