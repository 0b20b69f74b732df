"""Runs an LLM task over rows in a Ray actor pool: one engine (model copy) per actor.

Two shapes of task: an annotating task (refine, respond) fills columns of the row it was given;
a generating task (expand) turns each of its prompts into a new row that links to its seed.
Answers that cannot be parsed are generated again (up to `max_retries`, sampling with a new
seed); what still fails is rejected with the raw text, never dropped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import pyarrow as pa
import ray.data

from augment_ray.config import EngineSpec, SamplingParams
from augment_ray.engines import Completion, GenerationFailure
from augment_ray.io.journal import GenerationJournal
from augment_ray.progress import CallProgress, current_board, input_rows
from augment_ray.rows import (
    CANONICAL_TEXT,
    ID,
    ORIGIN_STEP,
    REJECT_DETAIL,
    REJECT_REASON,
    REJECT_STEP,
    SOURCE_ID,
    derived_id,
    live_mask,
    reject_rows,
    set_column,
)
from augment_ray.steps.base import Step
from augment_ray.steps.engine_pool import (
    EngineActor,
    describe_engine,
    map_with_engine_pool,
    pool_cpus,
    prepare_engine,
)
from augment_ray.tasks.base import LLMTask, Messages, ParseFailure

log = logging.getLogger(__name__)
# a greedy retry would repeat the same answer: retries sample at least this warm
RETRY_MIN_TEMPERATURE = 0.7


def lineage_columns(step: str, generates_rows: bool = False) -> dict[str, pa.DataType]:
    columns = {
        f"{step}_engine": pa.string(),
        f"{step}_model": pa.string(),
        f"{step}_template": pa.string(),
        f"{step}_sampling": pa.string(),
        f"{step}_prompt_tokens": pa.int32(),
        f"{step}_completion_tokens": pa.int32(),
        f"{step}_finish_reason": pa.string(),
        f"{step}_attempts": pa.int32(),
    }
    if generates_rows:
        columns[f"{step}_parent_id"] = pa.string()
    return columns


@dataclass
class RunOptions:
    """Per-step behaviour of the runner, besides the task itself."""

    max_retries: int = 2
    reject_truncated: bool = False
    keep_seeds: bool = True


@dataclass
class Generation:
    """One prompt of one row, and what became of it."""

    row: int
    index: int  # k-th prompt of the row (expand asks n times)
    messages: Messages
    attempts: int = 0
    completion: Completion | None = None
    values: dict[str, str] | None = None
    failure: tuple[str, str] | None = None


class GenerationRows:
    """Turns answered generations into output rows: the one place that knows the lineage
    columns, how an annotating task fills its row, and how a generating task makes new rows.
    Both ways of running a step (our engine pool, ray.data.llm) use it."""

    def __init__(self, step: str, engine_name: str, model_name: str, task: LLMTask,
                 sampling: SamplingParams) -> None:
        self.step = step
        self.engine_name = engine_name
        self.model_name = model_name
        self.task = task
        self.sampling = sampling

    def sampling_for(self, attempt: int) -> SamplingParams:
        if attempt == 0:
            return self.sampling
        return self.sampling.model_copy(update={
            "seed": self.sampling.seed + attempt,
            "temperature": max(self.sampling.temperature, RETRY_MIN_TEMPERATURE),
        })

    @cache  # noqa: B019 - one instance per actor; a handful of attempts
    def _sampling_json(self, attempt: int) -> str:
        return json.dumps(self.sampling_for(attempt).model_dump(), sort_keys=True)

    def parse(self, row: dict, generation: Generation, result: Completion | GenerationFailure,
              reject_truncated: bool) -> bool:
        """Record `result` on `generation`; True when the answer could not be parsed."""
        if isinstance(result, GenerationFailure):
            generation.failure = (result.reason, result.detail)
            return False
        generation.completion = result
        if result.finish_reason == "length" and reject_truncated:
            generation.failure = ("truncated", result.text[:500])
            return False
        try:
            generation.values = self.task.parse(row, result.text)
            generation.failure = None
        except ParseFailure as failure:
            generation.failure = (failure.reason, failure.detail or result.text[:500])
            return True
        except Exception as error:  # a parser bug rejects the row, not the run
            generation.failure = ("parse_error", f"{type(error).__name__}: {error}"[:500])
        return False

    def lineage(self, generation: Generation) -> dict[str, Any]:
        completion = generation.completion
        return {
            f"{self.step}_engine": self.engine_name,
            f"{self.step}_model": self.model_name,
            f"{self.step}_template": self.task.template_version,
            f"{self.step}_sampling": self._sampling_json(generation.attempts - 1),
            f"{self.step}_prompt_tokens": completion.prompt_tokens if completion else None,
            f"{self.step}_completion_tokens": completion.completion_tokens if completion else None,
            f"{self.step}_finish_reason": completion.finish_reason if completion else None,
            f"{self.step}_attempts": generation.attempts,
        }

    def annotated(self, table: pa.Table, generations: list[Generation],
                  unpromptable: dict[int, tuple[str, str]]) -> pa.Table:
        """`table` with the task's columns filled from each row's generation."""
        n = len(table)
        # rows the step did not answer keep what they had (a response it did not replace)
        columns: dict[str, list[Any]] = {
            name: table[name].to_pylist() if name in table.column_names else [None] * n
            for name in [*self.task.output_columns, *lineage_columns(self.step)]
        }
        failures = dict(unpromptable)
        for generation in generations:
            for name, value in self.lineage(generation).items():
                columns[name][generation.row] = value
            if generation.failure:
                failures[generation.row] = generation.failure
            else:
                for name, value in (generation.values or {}).items():
                    columns[name][generation.row] = value
        kinds = {**dict.fromkeys(self.task.output_columns, pa.string()),
                 **lineage_columns(self.step)}
        for name, values in columns.items():
            table = set_column(table, name, pa.array(values, kinds[name]))
        return reject_rows(table, self.step, failures)

    def with_new_columns(self, table: pa.Table) -> pa.Table:
        new_kinds = {**dict.fromkeys(self.task.output_columns, pa.string()),
                     **lineage_columns(self.step, generates_rows=True)}
        for name, kind in new_kinds.items():
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), kind))
        return table

    def with_new_rows(self, seeds: pa.Table, rows: dict[int, dict],
                      generations: list[Generation]) -> pa.Table:
        """`seeds` (already given the new columns) plus one new row per generation; a
        generation's `row` is its seed's key in `rows`."""
        blank = dict.fromkeys(seeds.column_names)
        created = []
        for generation in generations:
            seed = rows[generation.row]
            row = {
                **blank,
                **self.lineage(generation),
                **(generation.values or {}),
                ID: derived_id(seed[ID], self.step, generation.index),
                SOURCE_ID: seed[SOURCE_ID],
                ORIGIN_STEP: self.step,
                f"{self.step}_parent_id": seed[ID],
            }
            if generation.failure:
                row[REJECT_STEP] = self.step
                row[REJECT_REASON], row[REJECT_DETAIL] = generation.failure
            created.append(row)
        if not created:
            return seeds
        return pa.concat_tables([seeds, pa.Table.from_pylist(created, schema=seeds.schema)])


def prompt_rows(task: LLMTask, rows: dict[int, dict]
                ) -> tuple[list[Generation], dict[int, tuple[str, str]]]:
    """The generations to run for live `rows`, and the rows that cannot be prompted."""
    if hasattr(task, "with_batch"):  # tasks that show other rows as examples
        task.with_batch(list(rows.values()))
    generations: list[Generation] = []
    unpromptable: dict[int, tuple[str, str]] = {}
    for index, row in rows.items():
        try:
            prompts = task.prompts(row)
        except ParseFailure as failure:  # the row cannot be turned into a prompt
            unpromptable[index] = (failure.reason, failure.detail)
            continue
        except Exception as error:  # a prompt bug rejects the row, not the run
            unpromptable[index] = ("prompt_error", f"{type(error).__name__}: {error}"[:500])
            continue
        generations += [Generation(index, k, m) for k, m in enumerate(prompts)]
    return generations, unpromptable


def live_rows(table: pa.Table) -> dict[int, dict]:
    live = live_mask(table).to_pylist()
    indices = [i for i, alive in enumerate(live) if alive]
    return dict(zip(indices, table.take(indices).to_pylist(), strict=True)) if indices else {}


class LLMTaskRunner(EngineActor):
    """Ray Data actor UDF: loads the engine once, then answers one batch of rows per call."""

    progress_board: Any = None  # a ProgressBoard: told how far each call has got, as it runs

    def __init__(
        self, step: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams, options: RunOptions, journal: GenerationJournal | None = None,
        progress_board: Any = None,
    ) -> None:
        super().__init__(engine_spec, journal)
        self.step = step
        self.task = task
        self.options = options
        self.progress_board = progress_board
        self.out = GenerationRows(step, engine_name, self.engine.model_name, task, sampling)

    def _generate(self, rows: dict[int, dict], generations: list[Generation],
                  progress: CallProgress | None = None) -> None:
        pending = generations
        for attempt in range(self.options.max_retries + 1):
            if not pending:
                break
            results = self.engine.generate([g.messages for g in pending],
                                           self.out.sampling_for(attempt),
                                           **({"progress": progress} if progress else {}))
            retry = []
            for generation, result in zip(pending, results, strict=True):
                generation.attempts = attempt + 1
                if self.out.parse(rows[generation.row], generation, result,
                                  self.options.reject_truncated):
                    retry.append(generation)
            pending = retry

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = live_rows(table)
        generations, unpromptable = prompt_rows(self.task, rows)
        progress = None if self.progress_board is None else CallProgress(
            self.progress_board, self.step, input_rows(table), len(generations))
        started = time.perf_counter()
        try:
            self._generate(rows, generations, progress)
        except BaseException:
            if progress:
                progress.dropped()
            raise
        log_generation(self.step, len(rows), generations, time.perf_counter() - started)
        if progress:  # its share of rows was provisional: the count after the step replaces it
            progress.finished(sum(g.completion.completion_tokens for g in generations
                                  if g.completion))
        if not self.task.generates_rows:
            return self.out.annotated(table, generations, unpromptable)
        failures = dict(unpromptable)
        if not self.options.keep_seeds:
            failures.update({i: ("seed_not_kept", "") for i in rows if i not in failures})
        seeds = reject_rows(self.out.with_new_columns(table), self.step, failures)
        return self.out.with_new_rows(seeds, rows, generations)


def log_generation(step: str, rows: int, generations: list[Generation], seconds: float) -> None:
    tokens = sum(g.completion.completion_tokens for g in generations if g.completion)
    log.info("%s: %d rows, %d generations, %d tokens in %.1fs (%.1f tok/s)", step, rows,
             len(generations), tokens, seconds, tokens / seconds if seconds else 0)


class LLMStep(Step):
    def __init__(
        self, name: str, kind: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams, options: RunOptions | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.engine_name = engine_name
        self.engine_spec = engine_spec
        self.task = task
        self.sampling = sampling
        self.options = options or RunOptions()

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.runs_on_ray_data_llm:
            from augment_ray.steps.ray_data_llm import apply_with_ray_data_llm

            return apply_with_ray_data_llm(ds, self)
        return map_with_engine_pool(ds, LLMTaskRunner, self.engine_spec, {
            "step": self.name,
            "engine_name": self.engine_name,
            "task": self.task,
            "sampling": self.sampling,
            "options": self.options,
            "progress_board": current_board(),
        }, **self.pool_options())

    @property
    def runs_on_ray_data_llm(self) -> bool:
        spec = self.engine_spec
        return spec.kind == "vllm" and spec.execution == "ray_data_llm"

    def prepare(self) -> None:
        prepare_engine(self.engine_spec)

    def output_columns(self) -> list[str]:
        # canonical columns (a new row's instruction, a response) are the step's to write
        return [*(c for c in self.task.output_columns if c not in CANONICAL_TEXT),
                *lineage_columns(self.name, generates_rows=self.task.generates_rows)]

    def cpu_request(self) -> float:
        if self.runs_on_ray_data_llm:
            from augment_ray.steps.ray_data_llm import processor_cpus

            return processor_cpus(self.engine_spec)
        return pool_cpus(self.engine_spec)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **describe_engine(self.engine_name, self.engine_spec),
            "template": self.task.template_version,
            "sampling": self.sampling.model_dump(),
            # the processor answers each prompt once (see steps/ray_data_llm.py)
            "max_retries": 0 if self.runs_on_ray_data_llm else self.options.max_retries,
        }
