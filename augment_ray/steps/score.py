"""The score step (CLEAR): a judge engine's confidence that each row's response is good.

Per row, in two engine rounds: round 1 asks every selected method's prompts at once (grouped
by sampling parameters); round 2 asks BSDetector's "are you really sure" follow-up in the same
conversation as the first self-reflection answer. Each component is kept as a column; a row no
component could score is rejected (unscorable) with what went wrong.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import ray.data
from pydantic import Field, field_validator

from augment_ray.config.base import (
    EngineSpec,
    SamplingParams,
)
from augment_ray.config.steps import EngineStepSpec
from augment_ray.conversations import MESSAGES, apply_text_columns, last_assistant
from augment_ray.curate.confidence import answer_similarity, combine, rubric_certainty
from augment_ray.engines.base import Completion
from augment_ray.io.journal import GenerationJournal
from augment_ray.kinds import step_kind
from augment_ray.rows import live_mask, reject_rows, require_columns, set_column
from augment_ray.steps.base import Step
from augment_ray.steps.engine_pool import (
    EngineActor,
    PoolCall,
    Result,
    describe_in_pool,
    generate_grouped,
    pool_cpus,
    prepare_engine,
)
from augment_ray.tasks import judge
from augment_ray.tasks.base import Messages

log = logging.getLogger(__name__)


def score_columns(step: str, methods: list[str], turns: str = "last"
                  ) -> dict[str, pa.DataType]:
    return {
        f"{step}_confidence": pa.float64(),
        **({f"{step}_turn_confidences": pa.list_(pa.float64())} if turns == "each" else {}),
        **{f"{step}_{method}": pa.float64() for method in methods},
        f"{step}_notes": pa.string(),
        f"{step}_model": pa.string(),
        f"{step}_template": pa.string(),
        f"{step}_prompt_tokens": pa.int64(),
        f"{step}_completion_tokens": pa.int64(),
    }


ScoreMethod = Literal["p_yes", "self_reflection", "consistency", "rubric"]


class ScoreStepSpec(EngineStepSpec):
    """CLEAR: a confidence in [0, 1] that each row's response is a good answer to its
    instruction, from a judge engine. Methods (any combination; each kept as a column):
    p_yes (P(Yes) of a yes/no judge prompt, from logprobs), self_reflection (BSDetector's
    A/B/C question asked twice), consistency (agreement of sampled judge answers with the
    response), rubric (1-5 accuracy/helpfulness/detail, from JSON). The confidence is
    beta * consistency + (1 - beta) * mean(other components on a 0-1 scale)."""

    kind: Literal["score"]
    methods: list[ScoreMethod] = Field(
        default_factory=lambda: ["p_yes"], min_length=1,
        description="p_yes is one short forward pass per row; the others generate more",
    )
    instruction_column: str = Field("instruction", description="the question being answered")
    response_column: str = Field("output", description="the response being judged")
    turns: Literal["last", "each"] = Field(
        "last", description="on conversations: judge the last assistant turn given the turns "
        "before it, or each assistant turn given the turns before it (the row's confidence is "
        "the lowest; <name>_turn_confidences lists them)")
    beta: float = Field(0.7, ge=0.0, le=1.0, description="weight of observed consistency")
    consistency_samples: int = Field(3, gt=0, le=20, description="answers sampled per row (k)")
    consistency_temperature: float = Field(
        1.0, gt=0.0, description="sampling temperature of the consistency answers"
    )
    consistency_match: Literal["token_f1", "exact", "final_number"] = Field(
        "token_f1",
        description="how a sampled answer is compared with the response: word-bag F1, equal "
        "after folding, or the same final number (GSM8K-style '#### N' or the last number)",
    )
    top_logprobs: int = Field(
        20, gt=0, le=20, description="alternatives read per token for P(Yes) and A/B/C"
    )
    p_yes_tokens: int = Field(
        1, gt=0, le=16,
        description="answer tokens read for P(Yes): 1 is one forward pass (the first token); "
        "more lets a model open with a space, quote or '**' first",
    )
    judge_max_tokens: int = Field(
        8, gt=0, description="tokens for an A/B/C self-reflection answer"
    )
    rubric_max_tokens: int = Field(48, gt=0, description="tokens for a rubric JSON answer")

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value


@dataclass
class RowScore:
    """What the judge said about one row."""

    values: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reflection: list[str | None] = field(default_factory=list)

    def count(self, result: Result) -> None:
        if isinstance(result, Completion):
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens


class ScoreRunner(EngineActor):
    """Ray Data actor UDF: scores one batch of rows per call with the judge engine."""

    def __init__(self, engine_spec: EngineSpec, step: str, spec: ScoreStepSpec,
                 sampling: SamplingParams, journal: GenerationJournal | None = None,
                 progress_board: Any = None, engine_name: str = "") -> None:
        super().__init__(engine_spec, journal, step=step, progress_board=progress_board,
                         engine_name=engine_name)
        self.spec = spec
        # short greedy answers with top logprobs: yes/no and A/B/C
        self.judge_sampling = SamplingParams(
            temperature=0.0, max_tokens=spec.judge_max_tokens, seed=sampling.seed,
            logprobs=spec.top_logprobs,
        )
        self.p_yes_sampling = self.judge_sampling.model_copy(
            update={"max_tokens": spec.p_yes_tokens})
        self.rubric_sampling = SamplingParams(
            temperature=0.0, max_tokens=spec.rubric_max_tokens, seed=sampling.seed,
            json_schema=judge.RUBRIC_SCHEMA,
        )
        # one engine call per sample index, each with its own seed: engines that seed every
        # request (vLLM) would otherwise return k copies of one answer
        self.consistency_sampling = [
            sampling.model_copy(update={"temperature": spec.consistency_temperature,
                                        "seed": sampling.seed + j})
            for j in range(spec.consistency_samples)
        ]
        self.template = "+".join(judge.JUDGE_TEMPLATES[m] for m in spec.methods)

    def _first_round(self, questions: dict[int, str], responses: dict[int, str],
                     asks: dict[int, Messages]) -> list[tuple[int, str, Messages, SamplingParams]]:
        requests = []
        methods = self.spec.methods
        for index, question in questions.items():
            answer = responses[index]
            if "p_yes" in methods:
                requests.append((index, "p_yes", judge.yes_no_prompt(question, answer),
                                 self.p_yes_sampling))
            if "self_reflection" in methods:
                requests.append((index, "reflection", judge.reflection_prompt(question, answer),
                                 self.judge_sampling))
            if "rubric" in methods:
                requests.append((index, "rubric", judge.rubric_prompt(question, answer),
                                 self.rubric_sampling))
            if "consistency" in methods:
                prompt = asks.get(index) or judge.answer_prompt(question)
                requests += [(index, "consistency", prompt, sampling)
                             for sampling in self.consistency_sampling]
        return requests

    def _reflection_score(self, result: Result) -> str | None:
        if not isinstance(result, Completion):
            return None
        return judge.reflection_choice(result.text) or \
            judge.reflection_choice_from_logprobs(result.logprobs)

    def score(self, questions: dict[int, str], responses: dict[int, str],
              asks: dict[int, Messages] | None = None) -> dict[int, RowScore]:
        """`asks`: the prompt that answers a row's question, where not answer_prompt's (a
        conversation's turns)."""
        scores = {index: RowScore() for index in questions}
        requests = self._first_round(questions, responses, asks or {})
        results = generate_grouped(self.engine, [(m, s) for _, _, m, s in requests])
        similarities: dict[int, list[float]] = {index: [] for index in questions}
        followups = []
        for (index, kind, messages, _), result in zip(requests, results, strict=True):
            row = scores[index]
            row.count(result)
            if not isinstance(result, Completion):
                row.notes.append(f"{kind}: {result.reason} {result.detail}".strip())
                continue
            if kind == "p_yes":
                value = judge.yes_probability_of(result.logprobs)
                row.values["p_yes"] = value
                if value is None:
                    row.notes.append(f"p_yes: no Yes/No among the top tokens: {result.text!r}")
            elif kind == "reflection":
                row.reflection.append(self._reflection_score(result))
                followups.append((index, judge.reflection_followup(
                    messages, result.text, questions[index])))
            elif kind == "rubric":
                rubric = judge.rubric_scores(result.text)
                row.values["rubric"] = sum(rubric.values()) / len(rubric) if rubric else None
                if rubric is None:
                    row.notes.append(f"rubric: unparsable {result.text[:200]!r}")
            else:
                similarity = answer_similarity(result.text, responses[index],
                                               self.spec.consistency_match)
                if similarity is not None:
                    similarities[index].append(similarity)
        if followups:
            again = generate_grouped(self.engine, [(m, self.judge_sampling) for _, m in followups])
            for (index, _), result in zip(followups, again, strict=True):
                scores[index].count(result)
                scores[index].reflection.append(self._reflection_score(result))
        for index, row in scores.items():
            if "self_reflection" in self.spec.methods:
                letters = [c for c in row.reflection if c is not None]
                row.values["self_reflection"] = (
                    sum(judge.REFLECTION_SCORES[c] for c in letters) / len(letters)
                    if letters else None
                )
                row.notes.append("self_reflection: " + ",".join(c or "?" for c in row.reflection))
            if "consistency" in self.spec.methods:
                found = similarities[index]
                row.values["consistency"] = sum(found) / len(found) if found else None
                if not found:
                    row.notes.append(f"consistency: no sample comparable by "
                                     f"{self.spec.consistency_match}")
        return scores

    def confidence(self, row: RowScore) -> float | None:
        certainties = [row.values[m] for m in ("self_reflection", "p_yes")
                       if row.values.get(m) is not None]
        if row.values.get("rubric") is not None:
            certainties.append(rubric_certainty(row.values["rubric"]))
        return combine(row.values.get("consistency"), certainties, self.spec.beta)

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.spec
        require_columns(table, self.step, [spec.instruction_column, spec.response_column])
        live = live_mask(table).to_pylist()
        rows = table.to_pylist()
        questions, responses, asks, failures = {}, {}, {}, {}
        for index, (row, alive) in enumerate(zip(rows, live, strict=True)):
            if not alive:
                continue
            response = row.get(spec.response_column)
            if response is None or not str(response).strip():
                unanswered = row.get(MESSAGES) and last_assistant(row[MESSAGES]) is None
                failures[index] = ("missing_response", f"{spec.response_column} is empty" + (
                    ": the conversation has no assistant turn" if unanswered else ""))
                continue
            # a conversation's last answer is judged, given the turns before it (or each one)
            for key, part in judged_parts(index, row, str(response), spec.turns):
                questions[key] = judge.judged_text(part, spec.instruction_column)
                asks[key] = judge.answer_messages(part, spec.instruction_column)
                responses[key] = part["output"]

        started = time.perf_counter()
        scores = self.score(questions, responses, asks) if questions else {}
        log.info("%s: scored %d answers in %.1fs", self.step, len(scores),
                 time.perf_counter() - started)
        by_row: dict[int, list[tuple[int, RowScore]]] = {}
        for (index, answer), row_score in scores.items():
            by_row.setdefault(index, []).append((answer, row_score))

        n = len(table)
        kinds = score_columns(self.step, spec.methods, spec.turns)
        columns: dict[str, list[Any]] = {name: [None] * n for name in kinds}
        for index, parts in by_row.items():
            confidence, weakest, per_answer, notes = self.combined(parts)
            values = {
                f"{self.step}_confidence": confidence,
                **{f"{self.step}_{m}": weakest.values.get(m) for m in spec.methods},
                f"{self.step}_notes": notes or None,
                f"{self.step}_model": self.engine.model_name,
                f"{self.step}_template": self.template,
                f"{self.step}_prompt_tokens": sum(p.prompt_tokens for _, p in parts),
                f"{self.step}_completion_tokens": sum(p.completion_tokens for _, p in parts),
            }
            if spec.turns == "each":
                values[f"{self.step}_turn_confidences"] = per_answer
            for name, value in values.items():
                columns[name][index] = value
            if confidence is None:
                failures[index] = ("unscorable", notes[:1000])
        for name, values in columns.items():
            table = set_column(table, name, pa.array(values, kinds[name]))
        return reject_rows(table, self.step, failures)

    def combined(self, parts: list[tuple[int, RowScore]]
                 ) -> tuple[float | None, RowScore, list[float | None], str]:
        """A row's confidence from its judged answers (one, or each of a conversation's): the
        lowest, and None when any answer could not be scored (an answer not judged is not
        kept unchecked); the weakest answer's components; each answer's confidence; the notes,
        named by answer when there are several."""
        confidences = [self.confidence(score) for _, score in parts]
        scored = [c for c in confidences if c is not None]
        confidence = min(scored) if len(scored) == len(parts) else None
        weakest = parts[confidences.index(min(scored))][1] if scored else parts[0][1]
        if len(parts) == 1:
            notes = "; ".join(parts[0][1].notes)
        else:
            notes = "; ".join(f"answer {answer}: {note}" for answer, score in parts
                              for note in score.notes)
        return confidence, weakest, confidences, notes


def judged_parts(index: int, row: dict[str, Any], response: str, turns: str
                 ) -> list[tuple[tuple[int, int], dict[str, Any]]]:
    """What is judged of a row, keyed (row, answer number): the row itself; or with turns:
    each, one part per assistant turn of its conversation, that turn as `output` and the turns
    before it as the conversation (the last turn as `response` says)."""
    conversation = row.get(MESSAGES)
    if turns != "each" or not conversation:
        return [((index, 1), {**row, "output": response})]
    conversation = apply_text_columns(conversation, None, response)
    answers = [j for j, turn in enumerate(conversation) if turn["role"] == "assistant"]
    return [((index, k), {**row, MESSAGES: conversation[:j + 1],
                          "output": conversation[j]["content"]})
            for k, j in enumerate(answers, start=1)]


@step_kind(ScoreStepSpec)
class ScoreStep(Step):

    @classmethod
    def from_spec(cls, spec: Any, job: Any) -> ScoreStep:
        engine = job.engines[spec.engine]
        return cls(spec, spec.engine, engine, engine.sampling.merged(spec.sampling))

    def __init__(self, spec: ScoreStepSpec, engine_name: str, engine_spec: EngineSpec,
                 sampling: SamplingParams) -> None:
        self.name = spec.step_name
        self.spec = spec
        self.engine_name = engine_name
        self.engine_spec = engine_spec
        self.sampling = sampling

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return self.pool_call().map(ds)

    def pool_engine(self) -> tuple[str, EngineSpec]:
        return self.engine_name, self.engine_spec

    def pool_call(self) -> PoolCall:
        return PoolCall(self.name, self.engine_name, self.engine_spec, ScoreRunner,
                        {"spec": self.spec, "sampling": self.sampling}, **self.pool_options())

    def prepare(self) -> None:
        prepare_engine(self.engine_spec)

    def output_columns(self) -> list[str]:
        return list(score_columns(self.name, self.spec.methods, self.spec.turns))

    def cpu_request(self) -> float:
        return pool_cpus(self.engine_spec)

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            **super().describe(),
            **describe_in_pool(self.engine_name, self.engine_spec),
            "methods": spec.methods,
            **({"turns": "each"} if spec.turns == "each" else {}),
            "beta": spec.beta,
            **({"consistency": {"samples": spec.consistency_samples,
                                "temperature": spec.consistency_temperature,
                                "match": spec.consistency_match,
                                "max_tokens": self.sampling.max_tokens}}
               if "consistency" in spec.methods else {}),
        }
