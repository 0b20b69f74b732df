"""What every model-running step shares: a Ray Data actor pool of one engine (one model copy
per actor), the actor base that loads it, and sampling-grouped generation."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray.data

from augment_ray.config.base import EngineSpec, SamplingParams
from augment_ray.engines.base import (
    Completion,
    GenerationFailure,
    Messages,
    Result,
    build_engine,
    describe_engine,
    engine_class,
)
from augment_ray.io.journal import GenerationJournal
from augment_ray.progress import current_board, tell_model_load, tell_placement

log = logging.getLogger(__name__)

# several engine batches per call, so length-sorting has rows to group
ROWS_PER_CALL_FACTOR = 4

# called by an engine after each generated sub-batch: (prompts finished, completion tokens)
Progress = Callable[[int, int], None]


def log_to_driver() -> None:
    """Ray forwards a worker's stderr to the driver (and to `ray job logs`); send our INFO
    lines there so long runs show per-batch progress."""
    logger = logging.getLogger("augment_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class GuardedEngine:
    """The engine as steps see it: answers journaled by an earlier attempt are replayed, new
    ones journaled, and an engine call that raises becomes a per-prompt `engine_error` (the
    rows are rejected with the error; a step that rejects too many fails the run)."""

    def __init__(self, engine: Any, journal: GenerationJournal | None) -> None:
        self.engine = engine
        self.journal = journal
        self.model_name = engine.model_name

    def _generate(self, prompts: list[Messages], sampling: SamplingParams,
                  progress: Progress | None = None) -> list[Result]:
        # engines with natural sub-batches (transformers) report each; others once per call
        per_batch = progress is not None and getattr(self.engine, "reports_progress", False)
        try:
            if per_batch:
                results = self.engine.generate(prompts, sampling, progress=progress)
            else:
                results = self.engine.generate(prompts, sampling)
        except Exception as error:  # any engine bug becomes rejected rows
            log.exception("engine call of %d prompts failed", len(prompts))
            detail = f"{type(error).__name__}: {error}"[:500]
            results = [GenerationFailure("engine_error", detail)] * len(prompts)
        if progress is not None and not per_batch:
            progress(len(prompts), sum(r.completion_tokens for r in results
                                       if isinstance(r, Completion)))
        return results

    def generate(self, prompts: list[Messages], sampling: SamplingParams,
                 progress: Progress | None = None) -> list[Result]:
        """`progress` (optional, must not raise) hears of every finished sub-batch."""
        if self.journal is None:
            return self._generate(prompts, sampling, progress)
        fresh = [0]

        def generate_fresh(todo: list[Messages], params: SamplingParams) -> list[Result]:
            fresh[0] = len(todo)
            return self._generate(todo, params, progress)

        results = self.journal.generate(generate_fresh, prompts, sampling)
        if progress is not None and len(prompts) > fresh[0]:
            progress(len(prompts) - fresh[0], 0)  # answers replayed from the journal
        return results

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)


# while runners of steps that share a pool are built (steps/shared_engine.py), the engines
# loaded so far, by spec: they live in one actor and must share its one model copy
_SHARING: dict[str, Any] | None = None


@contextlib.contextmanager
def one_engine_per_spec() -> Iterator[None]:
    """Runners built inside share one engine per spec (loaded by the first that needs it)."""
    global _SHARING
    _SHARING = {}
    try:
        yield
    finally:
        _SHARING = None


def loaded_engine(spec: EngineSpec, engine_name: str = "", progress_board: Any = None) -> Any:
    """The engine `spec` describes (the one already loaded, inside one_engine_per_spec); a load
    is told to the board (the summary's `model_loads`)."""
    key = f"{type(spec).__name__}:{spec.model_dump_json()}"
    if _SHARING is not None and key in _SHARING:
        return _SHARING[key]
    engine = build_engine(spec)
    tell_model_load(progress_board, engine_name or spec.kind)
    if _SHARING is not None:
        _SHARING[key] = engine
    return engine


class EngineActor:
    """Base of the actor UDFs that hold a model: the engine is loaded once per actor (and shared
    by the runners of every step in it); with a journal, answers earlier attempts of the run
    journaled are replayed instead of generated. With a progress board, the actor tells it which
    node it runs on (the summary's `placement`) and when it loads a model (`model_loads`)."""

    def __init__(self, engine_spec: EngineSpec, journal: GenerationJournal | None = None, *,
                 step: str = "", progress_board: Any = None, engine_name: str = "") -> None:
        log_to_driver()
        self.step = step
        self.progress_board = progress_board
        self.engine = GuardedEngine(loaded_engine(engine_spec, engine_name, progress_board),
                                    journal.for_this_actor() if journal else None)
        tell_placement(progress_board, step)


def generate_grouped(engine: Any, requests: Sequence[tuple[Messages, SamplingParams]]
                     ) -> list[Result]:
    """One result per (messages, sampling) request, in order: requests that share sampling
    parameters go to the engine together, so a step can mix prompt kinds in one call."""
    groups: dict[SamplingParams, list[int]] = defaultdict(list)
    for index, (_, sampling) in enumerate(requests):
        groups[sampling].append(index)
    results: list[Result | None] = [None] * len(requests)
    for sampling, indices in groups.items():
        answers = engine.generate([requests[i][0] for i in indices], sampling)
        for index, answer in zip(indices, answers, strict=True):
            results[index] = answer
    return [result for result in results if result is not None]


def map_with_engine_pool(ds: ray.data.Dataset, runner: type, spec: EngineSpec,
                         constructor_kwargs: dict[str, Any], *,
                         journal: GenerationJournal | None = None,
                         max_restarts: int = 3) -> ray.data.Dataset:
    """ds.map_batches(runner) on a pool of `spec.replicas` actors, each with the engine's
    CPUs/GPUs (and `spec.resources`, custom Ray resources that place it); the runner's
    constructor gets `engine_spec`, `journal`, `progress_board` (the run's) and
    `constructor_kwargs`.
    An actor that dies (OOM, a crashed engine) is restarted and its batch retried, at most
    `max_restarts` times per actor; past that the run fails (Ray Data's default is forever)."""
    low, high = spec.replica_range
    calls = engine_class(spec).concurrent_calls(spec)
    threaded = {"max_concurrent_calls_per_actor": calls,
                "enable_true_multi_threading": True} if calls > 1 else {}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for an actor's restarts yet: ray_remote_args is the
        # only way, and it warns that it will be replaced
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            runner,
            fn_constructor_kwargs={"engine_spec": spec, "journal": journal,
                                   "progress_board": current_board(), **constructor_kwargs},
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
            batch_format="pyarrow",
            batch_size=spec.batch_size * ROWS_PER_CALL_FACTOR,
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, **threaded),
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus or None,
            resources=spec.resources or None,
        )


@dataclass(frozen=True)
class PoolCall:
    """One step's work on an engine pool: its runner (an EngineActor UDF) and what the runner is
    built with. Steps that name one engine one after another run their calls in one pool
    (steps/shared_engine.py); alone, a call is its own pool."""

    step: str
    engine_name: str
    spec: EngineSpec
    runner: type
    kwargs: dict[str, Any] = field(default_factory=dict)  # the runner's own arguments
    journal: Any = None
    max_restarts: int = 3

    def constructor_kwargs(self) -> dict[str, Any]:
        return {"step": self.step, "engine_name": self.engine_name, **self.kwargs}

    def build(self, progress_board: Any) -> Any:
        """The runner, in the actor that runs it."""
        return self.runner(engine_spec=self.spec, journal=self.journal,
                           progress_board=progress_board, **self.constructor_kwargs())

    def map(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """The call on a pool of its own."""
        return map_with_engine_pool(ds, self.runner, self.spec, self.constructor_kwargs(),
                                    journal=self.journal, max_restarts=self.max_restarts)


def describe_in_pool(name: str, spec: EngineSpec) -> dict[str, Any]:
    """describe_engine for a step that runs `spec` in an engine pool: a vllm engine's
    `execution` then says engine_pool whatever the spec's default for single-call steps."""
    described = describe_engine(name, spec)
    if "execution" in described:
        described["execution"] = "engine_pool"
    return described


def prepare_engine(spec: EngineSpec) -> None:
    """Fails fast with a clear message before the run (see Engine.prepare)."""
    engine_class(spec).prepare(spec)


def pool_cpus(spec: EngineSpec) -> float:
    """CPUs the pool holds at its largest (a vLLM engine's workers hold theirs too)."""
    return engine_class(spec).pool_cpus(spec)
