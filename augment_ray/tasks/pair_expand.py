"""Instruction-response pair expansion (PAI Instruct-Response-Exp): new pairs in the style of a
few seed pairs. The seed pairs of one prompt are the row itself plus k-1 others drawn from the
same batch with a RNG seeded by the step seed and the row id, so a rerun draws the same."""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import SamplingParams
from augment_ray.config.steps import CheckedStepSpec, PAIStepSpec
from augment_ray.kinds import step_kind
from augment_ray.steps.llm import LLMStep
from augment_ray.tasks.base import (
    Messages,
    ParseFailure,
    Row,
    detect_language,
    extract_tagged,
    first_exchange,
    load_template,
)
from augment_ray.validate.checks import Candidate, Embed, Failure, PairChecks

# alibaba-pai/Qwen2-7B-Instruct-Response-Exp, local copies
NATIVE_PAIR_MODEL = re.compile(r"qwen2-7b-instruct-response-exp", re.IGNORECASE)
PAIR_FORMAT = "### Instruction\n\n{q}\n\n### Response\n\n{a}"
_PAIR = re.compile(
    r"(?:###\s*Instruction\s*\n)?(?P<q>.*?)\n\s*###\s*Response\s*\n(?P<a>.*?)"
    r"(?=\n\s*###\s*Instruction|\Z)",
    re.DOTALL,
)


def is_native_pair_model(model: str) -> bool:
    return bool(NATIVE_PAIR_MODEL.search(model))


def format_pairs(pairs: list[tuple[str, str]]) -> str:
    return "\n\n".join(PAIR_FORMAT.format(q=q, a=a) for q, a in pairs)


def parse_pair(text: str) -> tuple[str, str] | None:
    """The first '### Instruction ... ### Response ...' pair in text (the header of the
    instruction may be missing: the model often continues right after it)."""
    match = _PAIR.search(text.strip())
    if not match:
        return None
    return match.group("q").strip(), match.group("a").strip()


class PairExpandTask:
    output_columns = ("instruction", "output")
    diversity_columns = ("instruction", "instruction")  # seeds' vs new rows'
    generates_rows = True

    def __init__(self, native: bool, k: int, n: int, seed: int,
                 checks: PairChecks | None = None) -> None:
        self.native = native
        self.checks = checks
        self.k = k
        self.n = n
        self.seed = seed
        self.template_version = "native" if native else "pair_expand.v1"
        self._pool: list[Row] = []

    def with_batch(self, rows: list[Row]) -> None:
        """The rows other seed pairs are drawn from: the live rows of this batch that have a
        pair (a conversation's is its first exchange)."""
        self._pool = [r for r in rows if all(first_exchange(r))]

    def _examples(self, row: Row) -> list[tuple[str | None, str | None]]:
        others = [r for r in self._pool if r["id"] != row["id"]]
        rng = random.Random(f"{self.seed}:{row['id']}")
        chosen = rng.sample(others, min(self.k - 1, len(others)))
        return [first_exchange(r) for r in [row, *chosen]]  # both set: see with_batch

    def prompts(self, row: Row) -> list[Messages]:
        if not all(first_exchange(row)):
            return []  # a seed without a response cannot show a pair: it is used by no prompt
        pairs = format_pairs(self._examples(row))
        if self.native:
            content = pairs
        else:
            template = load_template("pair_expand", "v1", detect_language(row["instruction"]))
            content = template.render(pairs=pairs)
        return [[{"role": "user", "content": content}] for _ in range(self.n)]

    def parse(self, row: Row, text: str) -> dict[str, str | None]:
        question = extract_tagged(text, "instruction")
        answer = extract_tagged(text, "response")
        if not (question and answer):
            pair = parse_pair(text)
            if pair is None:
                raise ParseFailure("unparsable_pair", text[:500])
            question, answer = pair
        if not question or not answer:
            raise ParseFailure("unparsable_pair", text[:500])
        if " ".join(question.lower().split()) == " ".join(row["instruction"].lower().split()):
            raise ParseFailure("copy_of_seed", question[:500])
        return {"instruction": question, "output": answer}

    def check(self, entries: list[tuple[Row, dict, Any, bool]], embed: Embed | None
              ) -> list[Failure | None]:
        """The new instruction as expand's (against its seed), then the new response as
        respond's (against the new instruction)."""
        assert self.checks is not None
        if not self.checks.enabled:
            return [None] * len(entries)
        verdicts = self.checks.instruction.check([
            Candidate(row["instruction"], values["instruction"], group, kept,
                      None if self.native else load_template(
                          "pair_expand", "v1", detect_language(row["instruction"])).text)
            for row, values, group, kept in entries], embed)
        todo = [i for i, (verdict, entry) in enumerate(zip(verdicts, entries, strict=True))
                if verdict is None and not entry[3]]
        answers = self.checks.response.check([
            Candidate(entries[i][1]["instruction"], entries[i][1]["output"]) for i in todo],
            embed)
        for i, verdict in zip(todo, answers, strict=True):
            verdicts[i] = verdict
        return verdicts


class PairExpandStepSpec(CheckedStepSpec, PAIStepSpec):
    """Instruction-response pair expansion: new pairs in the style of k seed pairs (the row and
    k-1 others drawn from the same batch). Rows without an output are used by no prompt."""

    kind: Literal["pair_expand"]
    k: int = Field(3, gt=0, le=16, description="seed pairs shown per prompt")
    n: int = Field(1, gt=0, le=64, description="new pairs per seed row")
    keep_seeds: bool = Field(
        True, description="false: seed rows go to _rejects (reason seed_not_kept)")
    checks: PairChecks = Field(
        default_factory=PairChecks, description="what a new pair must be to be kept "
        "(docs/CURATION.md#checks); false: keep every parsable answer")


@step_kind(PairExpandStepSpec)
class PairExpandStep(LLMStep):
    writes_response = True

    @classmethod
    def make_task(cls, spec: Any, job: Any, sampling: SamplingParams) -> PairExpandTask:
        native = spec.is_native(job.engines[spec.engine].model, is_native_pair_model)
        return PairExpandTask(native, spec.k, spec.n, sampling.seed, spec.checks)
