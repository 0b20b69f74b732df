"""Runs an LLM task over rows in a Ray actor pool: one engine (model copy) per actor."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa
import ray.data

from augment_ray.config import EngineSpec, SamplingParams
from augment_ray.engines import GenerationFailure, build_engine
from augment_ray.engines.model_files import model_display_name, resolve_model_dir
from augment_ray.rows import live_mask, reject, set_column
from augment_ray.steps.base import Step
from augment_ray.tasks.base import LLMTask, ParseFailure

log = logging.getLogger(__name__)
ROWS_PER_CALL_FACTOR = 4


def lineage_columns(step: str) -> dict[str, pa.DataType]:
    return {
        f"{step}_engine": pa.string(),
        f"{step}_model": pa.string(),
        f"{step}_template": pa.string(),
        f"{step}_sampling": pa.string(),
        f"{step}_prompt_tokens": pa.int32(),
        f"{step}_completion_tokens": pa.int32(),
        f"{step}_finish_reason": pa.string(),
    }


def _log_to_driver() -> None:
    """Ray forwards a worker's stderr to the driver (and to `ray job logs`); send our INFO
    lines there so long runs show per-batch progress."""
    logger = logging.getLogger("augment_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class LLMTaskRunner:
    """Ray Data actor UDF: loads the engine once, then answers one batch of rows per call."""

    def __init__(
        self, step: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams,
    ) -> None:
        _log_to_driver()
        self.step = step
        self.engine_name = engine_name
        self.task = task
        self.sampling = sampling
        self.engine = build_engine(engine_spec)
        self.sampling_json = json.dumps(sampling.model_dump(), sort_keys=True)

    def __call__(self, table: pa.Table) -> pa.Table:
        live = live_mask(table).to_pylist()
        indices = [i for i, alive in enumerate(live) if alive]
        rows = table.take(indices).to_pylist() if indices else []
        n = len(table)
        values: dict[str, list[Any]] = {name: [None] * n for name in lineage_columns(self.step)}
        output: list[str | None] = [None] * n
        failed = [False] * n
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n

        prompts, prompted = [], []
        for index, row in zip(indices, rows, strict=False):
            try:
                prompts.append(self.task.prompt(row))
                prompted.append((index, row))
            except ParseFailure as failure:  # the row cannot be turned into a prompt
                failed[index], reasons[index], details[index] = True, failure.reason, failure.detail
        started = time.perf_counter()
        results = self.engine.generate(prompts, self.sampling) if prompts else []
        seconds = time.perf_counter() - started
        tokens = sum(getattr(result, "completion_tokens", 0) for result in results)
        log.info("%s: %d rows, %d tokens in %.1fs (%.1f tok/s)", self.step, len(prompts),
                 tokens, seconds, tokens / seconds if seconds else 0.0)

        for (index, row), result in zip(prompted, results, strict=False):
            if isinstance(result, GenerationFailure):
                failed[index], reasons[index], details[index] = True, result.reason, result.detail
                continue
            values[f"{self.step}_engine"][index] = self.engine_name
            values[f"{self.step}_model"][index] = self.engine.model_name
            values[f"{self.step}_template"][index] = self.task.template_version
            values[f"{self.step}_sampling"][index] = self.sampling_json
            values[f"{self.step}_prompt_tokens"][index] = result.prompt_tokens
            values[f"{self.step}_completion_tokens"][index] = result.completion_tokens
            values[f"{self.step}_finish_reason"][index] = result.finish_reason
            try:
                output[index] = self.task.parse(row, result.text)
            except ParseFailure as failure:
                failed[index], reasons[index] = True, failure.reason
                details[index] = failure.detail or result.text[:500]

        table = set_column(table, self.task.output_column, pa.array(output, pa.string()))
        for name, kind in lineage_columns(self.step).items():
            table = set_column(table, name, pa.array(values[name], kind))
        if any(failed):
            table = reject(table, pa.array(failed), self.step, reasons, details)
        return table


class LLMStep(Step):
    def __init__(
        self, name: str, kind: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams,
    ) -> None:
        self.name = name
        self.kind = kind
        self.engine_name = engine_name
        self.engine_spec = engine_spec
        self.task = task
        self.sampling = sampling

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        spec = self.engine_spec
        return ds.map_batches(
            LLMTaskRunner,
            fn_constructor_kwargs={
                "step": self.name,
                "engine_name": self.engine_name,
                "engine_spec": spec,
                "task": self.task,
                "sampling": self.sampling,
            },
            batch_format="pyarrow",
            # several engine batches per call, so length-sorting has rows to group
            batch_size=spec.batch_size * ROWS_PER_CALL_FACTOR,
            compute=ray.data.ActorPoolStrategy(size=spec.replicas),
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus or None,
        )

    def prepare(self) -> None:
        # fails fast with a clear message, and converts a GGUF once instead of in every actor
        resolve_model_dir(self.engine_spec.model, self.engine_spec.cache_dir)

    def output_columns(self) -> list[str]:
        return [self.task.output_column, *lineage_columns(self.name)]

    def cpu_request(self) -> float:
        return self.engine_spec.replicas * self.engine_spec.num_cpus

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "engine": self.engine_name,
            "engine_kind": self.engine_spec.kind,
            "model": model_display_name(self.engine_spec.model),
            "template": self.task.template_version,
            "sampling": self.sampling.model_dump(),
            "replicas": self.engine_spec.replicas,
        }


