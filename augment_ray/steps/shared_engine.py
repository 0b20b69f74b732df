"""Steps that name one engine one after another share its pool: one model copy per replica.

A job that refines, then responds, then scores with the same teacher would otherwise start a
pool per step and hold the model three times. Here such a run of steps becomes one actor-pool
stage: each actor loads the engine once and builds every step's own runner around it
(engine_pool.one_engine_per_spec); a batch goes through the steps in order inside one actor
call, and the rows are counted after each step as a pool of its own would count them. Each
step keeps its runner, its journal (replay stays per step), its lineage, retries, checks and
rejects.

Only steps that are one call on an engine pool and nothing more share (Step.pool_engine): a step
with a barrier of its own (auto_correct's threshold) or any other step in between ends the run
of steps. `share: false` on the engine gives every step its own pool again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import ray.data

from augment_ray.config.base import EngineSpec
from augment_ray.progress import count_progress
from augment_ray.steps.base import Step
from augment_ray.steps.engine_pool import (
    PoolCall,
    map_with_engine_pool,
    one_engine_per_spec,
    pool_cpus,
)


class SharedEngineRunner:
    """Ray Data actor UDF: every step's runner on the actor's one engine, applied in order."""

    def __init__(self, engine_spec: Any, calls: Sequence[PoolCall], journal: Any = None,
                 progress_board: Any = None) -> None:
        del engine_spec, journal  # each call carries its own
        self.board = progress_board
        with one_engine_per_spec():  # the first runner loads the engine, the others share it
            self.links = [(call.step, call.build(progress_board)) for call in calls]

    def __call__(self, table: pa.Table) -> pa.Table:
        for step, runner in self.links:
            table = runner(table)
            if self.board is not None:
                count_progress(table, step, self.board)
        return table


class SharedEngineStage:
    """Consecutive steps on one engine, run in one pool."""

    def __init__(self, steps: Sequence[Step], spec: EngineSpec) -> None:
        self.steps = list(steps)
        self.spec = spec
        names = tuple(step.name for step in steps)
        for step in steps:
            step.pool_shared_by = names

    @property
    def name(self) -> str:
        return "+".join(step.name for step in self.steps)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """The steps on one pool; their rows are counted on the board as they pass each."""
        calls = [step.pool_call() for step in self.steps]
        return map_with_engine_pool(
            ds, SharedEngineRunner, self.spec, {"calls": calls},
            max_restarts=max(call.max_restarts for call in calls))

    def cpu_request(self) -> float:
        return pool_cpus(self.spec)


Stage = Step | SharedEngineStage


def _shares_with(previous: Step, step: Step) -> bool:
    before, engine = previous.pool_engine(), step.pool_engine()
    return before is not None and engine is not None and engine[1].share and before == engine


def plan_stages(steps: Sequence[Step]) -> list[Stage]:
    """The job's steps as the stages that run them: each run of two or more consecutive steps
    on one shared engine becomes a SharedEngineStage, every other step stays itself."""
    stages: list[Stage] = []
    start = 0
    for end in range(1, len(steps) + 1):
        if end < len(steps) and _shares_with(steps[end - 1], steps[end]):
            continue
        if end - start > 1:
            engine = steps[start].pool_engine()
            assert engine is not None  # _shares_with held
            stages.append(SharedEngineStage(steps[start:end], engine[1]))
        else:
            stages.append(steps[start])
        start = end
    return stages
