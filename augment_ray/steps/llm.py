"""Runs an LLM task over rows in a Ray actor pool: one engine (model copy) per actor.

Two shapes of task: an annotating task (refine, respond) fills columns of the row it was given;
a generating task (expand) turns each of its prompts into a new row that links to its seed.
Answers that cannot be parsed are generated again (up to `max_retries`, sampling with a new
seed); what still fails is rejected with the raw text, never dropped. A multi-turn task
(respond on a conversation) runs in rounds: every row's next turn, once its answer to the turn
before is in, with retries and checks per round.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray.data

from augment_ray.config.base import EngineSpec, SamplingParams
from augment_ray.conversations import MESSAGES
from augment_ray.engines.base import describe_engine
from augment_ray.engines.embedding_engine import EmbeddingEngineSpec
from augment_ray.errors import JobSpecError
from augment_ray.io.journal import GenerationJournal
from augment_ray.io.read import input_has_conversations
from augment_ray.progress import CallProgress, input_rows
from augment_ray.rows import CANONICAL_TEXT, reject_rows
from augment_ray.steps.base import Step
from augment_ray.steps.engine_pool import (
    EngineActor,
    PoolCall,
    describe_in_pool,
    pool_cpus,
    prepare_engine,
)
from augment_ray.steps.generation import (
    Generation,
    GenerationRows,
    RunOptions,
    lineage_columns,
    live_rows,
    prompt_rows,
)
from augment_ray.steps.ray_data_llm import apply_with_ray_data_llm
from augment_ray.tasks.base import LLMTask
from augment_ray.validate.checks import Embed
from augment_ray.validate.embedder import process_embedder

if TYPE_CHECKING:
    from augment_ray.config.io import InputSpec
    from augment_ray.config.job import JobSpec

log = logging.getLogger(__name__)


class LLMTaskRunner(EngineActor):
    """Ray Data actor UDF: loads the engine once, then answers one batch of rows per call."""

    progress_board: Any = None  # a ProgressBoard: told how far each call has got, as it runs
    embed: Embed | None = None  # the checks' embedder, when a check compares embeddings

    def __init__(
        self, step: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams, options: RunOptions, journal: GenerationJournal | None = None,
        progress_board: Any = None, embedder_spec: EmbeddingEngineSpec | None = None,
    ) -> None:
        super().__init__(engine_spec, journal, step=step, progress_board=progress_board,
                         engine_name=engine_name)
        self.task = task
        self.options = options
        self.out = GenerationRows(step, engine_name, self.engine.model_name, task, sampling)
        self.embed = process_embedder(embedder_spec) if embedder_spec else None

    def _generate(self, rows: dict[int, dict], generations: list[Generation],
                  progress: CallProgress | None = None) -> None:
        current = generations
        while current:  # one round per turn; a single-turn task has one
            self._answer(rows, current, progress)
            current = self.out.next_turns(current)

    def _answer(self, rows: dict[int, dict], generations: list[Generation],
                progress: CallProgress | None) -> None:
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
            invalid = self.out.check(rows, generations, self.embed)
            if self.options.retry_invalid:
                retry += invalid
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
            progress.finished(sum(a.completion_tokens for g in generations for a in g.answers))
        if not self.task.generates_rows:
            return self.out.annotated(table, generations, unpromptable)
        failures = dict(unpromptable)
        if not self.options.keep_seeds:
            failures.update({i: ("seed_not_kept", "") for i in rows if i not in failures})
        seeds = reject_rows(self.out.with_new_columns(table), self.step, failures)
        return self.out.with_new_rows(seeds, rows, generations)


def log_generation(step: str, rows: int, generations: list[Generation], seconds: float) -> None:
    tokens = sum(a.completion_tokens for g in generations for a in g.answers)
    log.info("%s: %d rows, %d generations, %d tokens in %.1fs (%.1f tok/s)", step, rows,
             len(generations), tokens, seconds, tokens / seconds if seconds else 0)


class LLMStep(Step):
    """A prompt + parse task on an engine. An LLM step kind is a subclass declared beside its
    task (tasks/<kind>.py) with its spec, registered with @step_kind, and make_task()."""

    kind = "llm"
    input_spec: InputSpec | None = None  # the job's input (from_spec)
    # a multi-turn task on conversations: answered in rounds, in an engine pool (prepare)
    in_rounds: bool = False

    def __init__(
        self, name: str, engine_name: str, engine_spec: EngineSpec, task: LLMTask,
        sampling: SamplingParams, options: RunOptions | None = None, kind: str | None = None,
        embedder_spec: EmbeddingEngineSpec | None = None,
    ) -> None:
        self.name = name
        self.embedder_spec = embedder_spec  # for checks that compare embeddings
        if kind is not None:  # a loop's own roles (student, teacher) are not registered kinds
            self.kind = kind
        self.engine_name = engine_name
        self.engine_spec = engine_spec
        self.task = task
        self.sampling = sampling
        self.options = options or RunOptions()

    @classmethod
    def make_task(cls, spec: Any, job: JobSpec, sampling: SamplingParams) -> LLMTask:
        """The task (prompt + parse) this kind runs for `spec`."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: Any, job: JobSpec) -> LLMStep:
        engine = job.engines[spec.engine]
        sampling = engine.sampling.merged(spec.sampling)
        n = getattr(spec, "n", 1)
        if n > 1 and sampling.temperature == 0:
            raise JobSpecError(
                f"Step {spec.step_name!r}: n: {n} with temperature 0 would give {n} copies "
                "of one answer; set steps[].sampling.temperature (e.g. 0.8)."
            )
        task = cls.make_task(spec, job, sampling)
        checks = getattr(task, "checks", None)
        embedder = getattr(spec, "embedder", None)
        step = cls(
            name=spec.step_name,
            engine_name=spec.engine,
            engine_spec=engine,
            task=task,
            sampling=sampling,
            options=RunOptions(
                max_retries=spec.max_retries,
                reject_truncated=spec.reject_truncated,
                keep_seeds=getattr(spec, "keep_seeds", True),
                retry_invalid=getattr(spec, "retry_invalid", False),
            ),
            embedder_spec=(job.engines[embedder] if embedder else EmbeddingEngineSpec())
            if checks is not None and checks.needs_embeddings else None,
        )
        step.input_spec = job.input
        return step

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.runs_on_ray_data_llm:
            return apply_with_ray_data_llm(ds, self)
        return self.pool_call().map(ds)

    def pool_engine(self) -> tuple[str, EngineSpec]:
        return self.engine_name, self.engine_spec

    def pool_call(self) -> PoolCall:
        return PoolCall(self.name, self.engine_name, self.engine_spec, LLMTaskRunner, {
            "task": self.task,
            "sampling": self.sampling,
            "options": self.options,
            "embedder_spec": self.embedder_spec,
        }, **self.pool_options())

    @property
    def runs_on_ray_data_llm(self) -> bool:
        # a step sharing its engine's pool with others runs in that pool
        return self.engine_spec.uses_ray_data_llm and not self.pool_shared_by and \
            not self.in_rounds

    def prepare(self) -> None:
        prepare_engine(self.engine_spec)
        if self.embedder_spec is not None:
            prepare_engine(self.embedder_spec)
        if self.engine_spec.uses_ray_data_llm and hasattr(self.task, "follow_up") and \
                self.input_spec is not None:
            # the processor answers every request in one pass; a conversation's turn k+1 is
            # asked only once turn k is answered
            self.in_rounds = input_has_conversations(self.input_spec)

    def output_columns(self) -> list[str]:
        # canonical columns (a new row's instruction, a response, a conversation's turns) are
        # the step's to write
        written = [*self.task.output_columns, *getattr(self.task, "conversation_columns", ())]
        return [*(c for c in written if c not in (*CANONICAL_TEXT, MESSAGES)),
                *lineage_columns(self.name, generates_rows=self.task.generates_rows)]

    def cpu_request(self) -> float:
        return pool_cpus(self.engine_spec)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **(describe_engine(self.engine_name, self.engine_spec) if self.runs_on_ray_data_llm
               else describe_in_pool(self.engine_name, self.engine_spec)),
            "template": self.task.template_version,
            "sampling": self.sampling.model_dump(),
            # the processor answers each prompt once (see steps/ray_data_llm.py)
            "max_retries": 0 if self.runs_on_ray_data_llm else self.options.max_retries,
            **diversity_columns(self.task),
            **checks_summary(self.task, self.embedder_spec),
        }


def checks_summary(task: LLMTask, embedder: EmbeddingEngineSpec | None) -> dict[str, Any]:
    """The summary's `checks` key, {reason: threshold, or true} of the checks that are on, and
    the embedder their cosines came from."""
    checks = getattr(task, "checks", None)
    if checks is None:
        return {}
    described = checks.describe()
    summary: dict[str, Any] = {"checks": described}
    if embedder is not None and described:
        summary["checks_embedder"] = describe_engine("embedder", embedder)["model"]
    return summary


def diversity_columns(task: LLMTask) -> dict[str, Any]:
    """The summary's `diversity` key: which column holds what the step got and what it wrote,
    and whether what it wrote is new rows (expand) or a column of the same rows (refine)."""
    columns = getattr(task, "diversity_columns", None)
    if columns is None:
        return {}
    return {"diversity": {"input": columns[0], "output": columns[1],
                          "new_rows": task.generates_rows}}
