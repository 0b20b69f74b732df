"""CLEAR Auto-Correct: rows whose confidence is below the dataset threshold get a candidate
response from `engine`; `judge` gives the confidence that the candidate is better than the
original (P(Yes) of a comparison prompt, asked in both orders by default); the candidate
replaces the response only when that confidence is >= eta. Otherwise the row is rejected
(not_corrected) with both texts kept. Rows at or above the threshold pass unchanged. A
conversation's response is its last assistant turn (`output`), rewritten and compared given
the turns before it; export puts a corrected `output` back into that turn.

Two phases: candidate (writer engine) then compare (judge engine). With one engine for both,
one actor pool runs both phases on one model copy; with two, each has its own pool.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import pyarrow as pa
import ray.data
from pydantic import Field

from augment_ray.config.base import EngineSpec, SamplingOverrides, SamplingParams
from augment_ray.engines.base import Completion, describe_engine
from augment_ray.io.journal import GenerationJournal
from augment_ray.kinds import step_kind
from augment_ray.rows import live_mask, reject_rows, require_columns, set_column
from augment_ray.steps.auto_filter import (
    ConfidenceThresholdSpec,
    Threshold,
    dataset_threshold,
    split_by_threshold,
)
from augment_ray.steps.base import Step
from augment_ray.steps.engine_pool import (
    EngineActor,
    generate_grouped,
    map_with_engine_pool,
    pool_cpus,
    prepare_engine,
)
from augment_ray.tasks import judge

log = logging.getLogger(__name__)

CANDIDATE_PHASE = "candidate"
COMPARE_PHASE = "compare"


def correct_columns(step: str) -> dict[str, pa.DataType]:
    return {
        f"{step}_candidate": pa.string(),
        f"{step}_better_confidence": pa.float64(),
        f"{step}_corrected": pa.bool_(),
        f"{step}_original_output": pa.string(),
        f"{step}_model": pa.string(),
        f"{step}_judge_model": pa.string(),
        f"{step}_prompt_tokens": pa.int64(),
        f"{step}_completion_tokens": pa.int64(),
    }


def better_confidence(candidate_second: float | None, candidate_first: float | None
                      ) -> float | None:
    """Confidence that the candidate is better, from P(Yes) of "is B better than A" asked with
    the candidate as B and (optionally) with it as A: the second answer counts as 1 - P(Yes)."""
    values = [v for v in (candidate_second,
                          None if candidate_first is None else 1.0 - candidate_first)
              if v is not None]
    return sum(values) / len(values) if values else None


def replaces(confidence: float | None, eta: float) -> bool:
    """The Auto-Correct rule: replace only when the judge is confident enough."""
    return confidence is not None and confidence >= eta


class AutoCorrectStepSpec(ConfidenceThresholdSpec):
    """CLEAR Auto-Correct: for rows below the threshold, `engine` writes a candidate response and
    `judge` says whether it is better than the original; the candidate replaces the response
    only when that confidence is >= eta, else the row is rejected (not_corrected). The original
    response is kept in `<name>_original_output`."""

    engine_fields: ClassVar[dict[str, str]] = {"engine": "chat", "judge": "chat"}

    kind: Literal["auto_correct"]
    engine: str = Field(description="engine that writes candidate responses")
    judge: str | None = Field(None, description="engine that compares; default: `engine`")
    sampling: SamplingOverrides | None = Field(
        None, description="sampling of the candidate responses"
    )
    eta: float = Field(0.8, ge=0.0, le=1.0, description="confidence needed to replace")
    instruction_column: str = Field("instruction", description="the question being answered")
    response_column: str = Field("output", description="the response judged and corrected")
    both_orders: bool = Field(
        True,
        description="ask the comparison with the candidate second and again with it first, "
        "and average (cancels the judge's position bias; twice the judge passes)",
    )
    top_logprobs: int = Field(
        20, gt=0, le=20, description="alternatives read per token for the judge's P(better)")


class CorrectRunner(EngineActor):
    def __init__(self, engine_spec: EngineSpec, step: str, spec: AutoCorrectStepSpec,
                 threshold: Threshold, sampling: SamplingParams, phases: tuple[str, ...],
                 journal: GenerationJournal | None = None, progress_board: Any = None,
                 engine_name: str = "") -> None:
        super().__init__(engine_spec, journal, step=step, progress_board=progress_board,
                         engine_name=engine_name)
        self.spec = spec
        self.threshold = threshold
        self.sampling = sampling
        self.phases = phases
        self.judge_sampling = SamplingParams(
            temperature=0.0, max_tokens=8, seed=sampling.seed, logprobs=spec.top_logprobs
        )

    def _columns(self, table: pa.Table) -> dict[str, list[Any]]:
        n = len(table)
        return {name: table[name].to_pylist() if name in table.column_names else [None] * n
                for name in correct_columns(self.step)}

    def _candidates(self, table: pa.Table, columns: dict[str, list[Any]],
                    failures: dict[int, tuple[str, str]]) -> None:
        spec = self.spec
        below, missing = split_by_threshold(table, spec.confidence_column, self.threshold,
                                            self.step)
        failures.update(missing)
        live = live_mask(table).to_pylist()
        rows = table.to_pylist()
        wanted = [i for i, b in enumerate(below) if b]
        for index, alive in enumerate(live):
            if alive and index not in missing:
                columns[f"{self.step}_corrected"][index] = False
        # a conversation's candidate answers its last answered user turn, given the turns before
        prompts = [judge.answer_messages(rows[i], spec.instruction_column) for i in wanted]
        results = generate_grouped(self.engine, [(p, self.sampling) for p in prompts])
        for index, result in zip(wanted, results, strict=True):
            columns[f"{self.step}_model"][index] = self.engine.model_name
            if not isinstance(result, Completion):
                failures[index] = ("candidate_failed", f"{result.reason}: {result.detail}")
                continue
            columns[f"{self.step}_prompt_tokens"][index] = result.prompt_tokens
            columns[f"{self.step}_completion_tokens"][index] = result.completion_tokens
            if not result.text.strip():
                failures[index] = ("candidate_failed", "empty candidate response")
                continue
            columns[f"{self.step}_candidate"][index] = result.text

    def _compare(self, table: pa.Table, columns: dict[str, list[Any]],
                 failures: dict[int, tuple[str, str]]) -> pa.Table:
        spec, step = self.spec, self.step
        live = live_mask(table).to_pylist()
        rows = table.to_pylist()
        candidates = columns[f"{step}_candidate"]
        wanted = [i for i, c in enumerate(candidates)
                  if c is not None and live[i] and i not in failures]
        requests = []
        for index in wanted:
            question = judge.judged_text(rows[index], spec.instruction_column)
            original = str(rows[index].get(spec.response_column) or "")
            requests.append(judge.compare_prompt(question, original, candidates[index]))
            if spec.both_orders:
                requests.append(judge.compare_prompt(question, candidates[index], original))
        results = generate_grouped(self.engine, [(r, self.judge_sampling) for r in requests])
        per_row = 2 if spec.both_orders else 1
        responses = table[spec.response_column].to_pylist()
        for k, index in enumerate(wanted):
            answers = results[k * per_row:(k + 1) * per_row]
            probabilities = [judge.yes_probability_of(a.logprobs)
                             if isinstance(a, Completion) else None for a in answers]
            for answer in answers:
                if isinstance(answer, Completion):
                    for suffix, value in (("prompt_tokens", answer.prompt_tokens),
                                          ("completion_tokens", answer.completion_tokens)):
                        name = f"{step}_{suffix}"
                        columns[name][index] = (columns[name][index] or 0) + value
            confidence = better_confidence(probabilities[0],
                                           probabilities[1] if spec.both_orders else None)
            columns[f"{step}_better_confidence"][index] = confidence
            columns[f"{step}_judge_model"][index] = self.engine.model_name
            if confidence is None:
                texts = [a.text if isinstance(a, Completion) else a.reason for a in answers]
                failures[index] = ("judge_unreadable", f"no Yes/No among the top tokens: {texts}")
            elif replaces(confidence, spec.eta):
                columns[f"{step}_original_output"][index] = responses[index]
                columns[f"{step}_corrected"][index] = True
                responses[index] = candidates[index]
            else:
                failures[index] = ("not_corrected", f"candidate better with confidence "
                                   f"{confidence:.4f} < eta {spec.eta:g}")
        return set_column(table, spec.response_column,
                          pa.array(responses, table.schema.field(spec.response_column).type))

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.spec
        require_columns(table, self.step, [spec.instruction_column, spec.response_column,
                                           spec.confidence_column])
        columns = self._columns(table)
        failures: dict[int, tuple[str, str]] = {}
        if CANDIDATE_PHASE in self.phases:
            self._candidates(table, columns, failures)
            table = reject_rows(table, self.step, failures)
            failures = {}
        if COMPARE_PHASE in self.phases:
            table = self._compare(table, columns, failures)
        kinds = correct_columns(self.step)
        for name, values in columns.items():
            table = set_column(table, name, pa.array(values, kinds[name]))
        return reject_rows(table, self.step, failures)


@step_kind(AutoCorrectStepSpec)
class AutoCorrectStep(Step):

    @classmethod
    def from_spec(cls, spec: Any, job: Any) -> AutoCorrectStep:
        engine = job.engines[spec.engine]
        return cls(spec, engine, job.engines[spec.judge or spec.engine],
                   engine.sampling.merged(spec.sampling))

    def __init__(self, spec: AutoCorrectStepSpec, engine_spec: EngineSpec,
                 judge_spec: EngineSpec, sampling: SamplingParams) -> None:
        self.name = spec.step_name
        self.spec = spec
        self.engine_spec = engine_spec
        self.judge_spec = judge_spec
        self.sampling = sampling
        self.shared = spec.judge is None or spec.judge == spec.engine
        self.threshold: Threshold | None = None

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        ds, self.threshold = dataset_threshold(ds, self.spec, self.name)
        common = {"step": self.name, "spec": self.spec, "threshold": self.threshold,
                  "sampling": self.sampling, "engine_name": self.spec.engine}
        if self.shared:
            return map_with_engine_pool(ds, CorrectRunner, self.engine_spec,
                                        {**common, "phases": (CANDIDATE_PHASE, COMPARE_PHASE)},
                                        **self.pool_options())
        ds = map_with_engine_pool(ds, CorrectRunner, self.engine_spec,
                                  {**common, "phases": (CANDIDATE_PHASE,)},
                                  **self.pool_options())
        return map_with_engine_pool(ds, CorrectRunner, self.judge_spec,
                                    {**common, "phases": (COMPARE_PHASE,),
                                     "engine_name": self.spec.judge or self.spec.engine},
                                    **self.pool_options("judge"))

    def prepare(self) -> None:
        prepare_engine(self.engine_spec)
        if not self.shared:
            prepare_engine(self.judge_spec)

    def output_columns(self) -> list[str]:
        return list(correct_columns(self.name))

    def cpu_request(self) -> float:
        return pool_cpus(self.engine_spec) + (0 if self.shared else pool_cpus(self.judge_spec))

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            **super().describe(),
            **describe_engine(spec.engine, self.engine_spec),
            "judge": describe_engine(spec.judge or spec.engine, self.judge_spec),
            "eta": spec.eta,
            "both_orders": spec.both_orders,
            "confidence_column": spec.confidence_column,
            **(self.threshold.describe() if self.threshold else {}),
        }
