"""What both ways of running an LLM task share (our engine pool: steps/llm.py; ray.data.llm:
steps/ray_data_llm.py): the prompts of a batch's live rows, the parse of each answer with its
retries' sampling, the turns of a multi-turn task, and the output rows with their lineage
columns.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import pyarrow as pa

from augment_ray.config.base import SamplingParams
from augment_ray.conversations import CONVERSATION_TYPE, MESSAGES, row_conversation
from augment_ray.engines.base import Completion, GenerationFailure, Messages
from augment_ray.rows import (
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
from augment_ray.tasks.base import LLMTask, ParseFailure
from augment_ray.validate.checks import Embed

# a greedy retry would repeat the same answer: retries sample at least this warm
RETRY_MIN_TEMPERATURE = 0.7
# an actor may run several batches at once (Engine.concurrent_calls): a task's with_batch()
# state must hold while that batch's prompts are written
_PROMPTING = threading.Lock()


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
    retry_invalid: bool = False  # an answer a check rejects is generated again


@dataclass
class Generation:
    """One prompt of one row, and what became of it. A multi-turn task's row keeps one
    Generation through its turns: `messages` is the current turn's prompt."""

    row: int
    index: int  # k-th prompt of the row (expand asks n times)
    messages: Messages
    attempts: int = 0
    completion: Completion | None = None
    values: dict[str, Any] | None = None
    failure: tuple[str, str] | None = None
    checked: bool = False  # its values passed the task's checks
    turn: int = 0  # the user turn of a conversation being answered (from 1); 0: one prompt
    follow: Messages | None = None  # the next turn's prompt, once this turn's answer parsed
    earlier: list[Completion] = dataclasses.field(default_factory=list)  # earlier turns'
    most_attempts: int = 0  # of the earlier turns

    def advance(self) -> None:
        """On to the next turn (its prompt in `follow`)."""
        assert self.completion is not None and self.follow is not None
        self.earlier.append(self.completion)
        self.most_attempts = max(self.most_attempts, self.attempts)
        self.messages, self.follow, self.turn = self.follow, None, self.turn + 1
        self.attempts, self.completion, self.values, self.checked = 0, None, None, False

    @property
    def answers(self) -> list[Completion]:
        return [*self.earlier, *([self.completion] if self.completion else [])]

    def reject_reason(self) -> tuple[str, str]:
        """`failure`, its detail naming the turn of a conversation that failed."""
        assert self.failure is not None
        reason, detail = self.failure
        return (reason, f"user turn {self.turn}: {detail}") if self.turn else (reason, detail)


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
        """Record `result` on `generation`; True when the answer could not be parsed. A
        multi-turn task's answer also gives the prompt of the row's next turn."""
        generation.follow = None
        if isinstance(result, GenerationFailure):
            generation.failure = (result.reason, result.detail)
            return False
        generation.completion = result
        if result.finish_reason == "length" and reject_truncated:
            generation.failure = ("truncated", result.text[:500])
            return False
        try:
            values = self.task.parse(row, result.text)
            if hasattr(self.task, "follow_up"):
                values, generation.follow = self.task.follow_up(row, generation.messages, values)
            generation.values, generation.failure = values, None
        except ParseFailure as failure:
            generation.failure = (failure.reason, failure.detail or result.text[:500])
            return True
        except Exception as error:  # a parser bug rejects the row, not the run
            generation.failure = ("parse_error", f"{type(error).__name__}: {error}"[:500])
        return False

    def check(self, rows: Mapping[int, dict] | list[dict], generations: list[Generation],
              embed: Embed | None) -> list[Generation]:
        """Run the task's checks (validate/checks.py) on the answers parsed since the last
        call; one that fails gets the check's reason as its failure. Returns those that failed.
        Answers checked earlier stay in the batch as siblings to compare with."""
        fresh = [g for g in generations if g.values is not None and g.failure is None
                 and not g.checked]
        if not fresh or getattr(self.task, "checks", None) is None:
            return []
        judged = [g for g in generations if g.checked] + fresh
        # siblings: the answers of one seed row (by id: on ray.data.llm each has its own row)
        entries = [(rows[g.row], g.values, rows[g.row].get(ID), g.checked) for g in judged]
        try:
            verdicts = self.task.check(entries, embed)
        except Exception as error:  # a checker bug rejects the rows, not the run
            verdicts = [("check_error", f"{type(error).__name__}: {error}"[:500])] * len(judged)
        failed = []
        for generation, verdict in zip(judged, verdicts, strict=True):
            if generation.checked:
                continue
            if verdict is None:
                generation.checked = True
            else:
                generation.values, generation.failure = None, verdict
                failed.append(generation)
        return failed

    def next_turns(self, generations: list[Generation]) -> list[Generation]:
        """The generations whose accepted answer opened another turn, moved on to it."""
        moving = [g for g in generations
                  if g.follow is not None and g.failure is None and g.values is not None]
        for generation in moving:
            generation.advance()
        return moving

    def lineage(self, generation: Generation) -> dict[str, Any]:
        """A conversation's tokens are summed over its turns; its attempts are the most any
        turn took."""
        completion = generation.completion
        answers = generation.answers
        attempts = max(generation.attempts, generation.most_attempts)
        return {
            f"{self.step}_engine": self.engine_name,
            f"{self.step}_model": self.model_name,
            f"{self.step}_template": self.task.template_version,
            f"{self.step}_sampling": self._sampling_json(attempts - 1),
            f"{self.step}_prompt_tokens": sum(a.prompt_tokens for a in answers)
            if answers else None,
            f"{self.step}_completion_tokens": sum(a.completion_tokens for a in answers)
            if answers else None,
            f"{self.step}_finish_reason": completion.finish_reason if completion else None,
            f"{self.step}_attempts": attempts,
        }

    def column_kinds(self, table: pa.Table) -> dict[str, pa.DataType]:
        """The task's columns on `table` and their types: text columns are strings; a
        multi-turn task's conversation columns are CONVERSATION_TYPE, written only where the
        rows carry conversations (a `messages` column)."""
        kinds = dict.fromkeys(self.task.output_columns, pa.string())
        if MESSAGES in table.column_names:
            kinds.update(dict.fromkeys(getattr(self.task, "conversation_columns", ()),
                                       CONVERSATION_TYPE))
        return {**kinds, **lineage_columns(self.step)}

    def annotated(self, table: pa.Table, generations: list[Generation],
                  unpromptable: dict[int, tuple[str, str]]) -> pa.Table:
        """`table` with the task's columns filled from each row's generation."""
        n = len(table)
        kinds = self.column_kinds(table)
        # rows the step did not answer keep what they had (a response it did not replace)
        columns: dict[str, list[Any]] = {
            name: table[name].to_pylist() if name in table.column_names else [None] * n
            for name in kinds
        }
        failures = dict(unpromptable)
        for generation in generations:
            for name, value in self.lineage(generation).items():
                columns[name][generation.row] = value
            if generation.failure:
                failures[generation.row] = generation.reject_reason()
            else:
                for name, value in (generation.values or {}).items():
                    if name in columns:
                        columns[name][generation.row] = value
        for name, values in columns.items():
            table = set_column(table, name, pa.array(values, kinds[name]))
        return reject_rows(table, self.step, failures)

    def with_new_columns(self, table: pa.Table) -> pa.Table:
        new_kinds = {**dict.fromkeys(self.task.output_columns, pa.string()),
                     **lineage_columns(self.step, generates_rows=True)}
        for name, kind in new_kinds.items():
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), kind))
            elif pa.types.is_null(table.schema.field(name).type):
                # a block in which no row had a value yet (Ray Data infers type null): the new
                # rows' values would not fit it
                table = set_column(table, name, pa.nulls(len(table), kind))
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
        seeds = typed_from_values(seeds, created)
        return pa.concat_tables([seeds, pa.Table.from_pylist(created, schema=seeds.schema)])


def typed_from_values(table: pa.Table, rows: list[dict]) -> pa.Table:
    """`table` with each column Ray Data typed null (no value in this block yet) given the
    type of its values in `rows`, so that `rows` fit the table's schema."""
    for field in table.schema:
        if pa.types.is_null(field.type):
            kind = pa.array([row.get(field.name) for row in rows]).type
            if not pa.types.is_null(kind):
                table = set_column(table, field.name, pa.nulls(len(table), kind))
    return table


def prompt_rows(task: LLMTask, rows: dict[int, dict]
                ) -> tuple[list[Generation], dict[int, tuple[str, str]]]:
    """The generations to run for live `rows`, and the rows that cannot be prompted."""
    with _PROMPTING:
        return _prompt_rows(task, rows)


def _prompt_rows(task: LLMTask, rows: dict[int, dict]
                 ) -> tuple[list[Generation], dict[int, tuple[str, str]]]:
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
        # a conversation's turns are answered in rounds, the first now
        turn = 1 if hasattr(task, "follow_up") and row_conversation(row) is not None else 0
        generations += [Generation(index, k, m, turn=turn) for k, m in enumerate(prompts)]
    return generations, unpromptable


def live_rows(table: pa.Table) -> dict[int, dict]:
    live = live_mask(table).to_pylist()
    indices = [i for i, alive in enumerate(live) if alive]
    return dict(zip(indices, table.take(indices).to_pylist(), strict=True)) if indices else {}
