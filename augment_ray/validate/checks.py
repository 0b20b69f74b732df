"""The checks a generating step runs on what its model wrote before keeping it.

Each family is a pydantic spec (its thresholds; null turns one check off, `enabled: false` all
of them) with a `check()` that judges a batch of candidates at once, so the embedder sees one
call per batch. A failed check rejects the row with the check's reason and the measured value in
`reject_detail`. Thresholds were chosen on benchmarks/data/validator_labels.jsonl (see
benchmarks/validators.py and docs/CURATION.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from augment_ray.config.base import Spec
from augment_ray.curate.text import fold_str
from augment_ray.validate.text import echo_share, not_a_request, refusal, template_echo

# texts -> unit vectors, one row per text
Embed = Callable[[list[str]], np.ndarray]
Failure = tuple[str, str]  # (reason, detail)

DETAIL_TEXT = 300  # characters of the candidate kept in reject_detail


@dataclass
class Candidate:
    """One answer to judge: `source` is what it must stay faithful to (the original or seed
    instruction, or the instruction a response answers); `group` ties the siblings of one seed
    together, `kept` marks a sibling accepted earlier (compared against, not judged again)."""

    source: str
    text: str
    group: Any = None
    kept: bool = False
    template: str | None = None  # the prompt that asked for it (its wording is no content)
    # what the answer's embedding is compared with when more than `source`: a conversation's
    # follow-up ("rewrite your previous answer") is on topic with the questions before it
    topic: str | None = None


class Checks(Spec):
    """Off switch shared by every family; `checks: false` in YAML means `enabled: false`."""

    enabled: bool = Field(True, description="false: keep every parsable answer unchecked")

    @model_validator(mode="before")
    @classmethod
    def _false_is_off(cls, value: Any) -> Any:
        return {"enabled": False} if value is False else value

    @property
    def needs_embeddings(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        """{reason: threshold, or true for a check without one} of the checks that are on."""
        raise NotImplementedError

    def check(self, candidates: Sequence[Candidate], embed: Embed | None
              ) -> list[Failure | None]:
        raise NotImplementedError


def _detail(measured: str, text: str) -> str:
    return f"{measured}: {text[:DETAIL_TEXT]}"


def _vectors(candidates: Sequence[Candidate], embed: Embed | None
             ) -> tuple[np.ndarray, dict[str, int]]:
    """One embed call for every distinct text of the batch: (vectors, row of each text)."""
    if embed is None:
        raise RuntimeError("an embedding check ran without an embedder")
    texts = sorted({t for c in candidates for t in (c.source, c.text)})
    return embed(texts), {t: i for i, t in enumerate(texts)}


def _cosines(candidates: Sequence[Candidate], embed: Embed | None) -> list[float]:
    """cos(source, text) per candidate."""
    if not candidates:
        return []
    vectors, index = _vectors(candidates, embed)
    return [float(vectors[index[c.source]] @ vectors[index[c.text]]) for c in candidates]


class RequestChecks(Checks):
    """What a rewritten or new instruction must be: a request, with no prompt scaffolding."""

    request: bool = Field(True, description="reject a text that answers or states instead of "
                          "asking (reason not_a_request)")
    template_echo: bool = Field(True, description="reject a text carrying prompt scaffolding "
                                "('Rewritten instruction:', the template's own words) "
                                "(reason template_echo)")

    def _text_failure(self, text: str, template: str | None) -> Failure | None:
        if self.template_echo and (found := template_echo(text, template)):
            return "template_echo", _detail(found, text)
        if self.request and (found := not_a_request(text)):
            return "not_a_request", _detail(found, text)
        return None

    def _describe_text(self) -> dict[str, Any]:
        return {**({"template_echo": True} if self.template_echo else {}),
                **({"not_a_request": True} if self.request else {})}


class RewriteChecks(RequestChecks):
    """refine: still a request, faithful to the original, and adding to it."""

    min_similarity: float | None = Field(
        0.5, ge=-1, le=1, description="least embedding cosine to the original instruction "
        "(reason unfaithful); null: off")
    min_length_ratio: float | None = Field(
        1.0, ge=0, description="least length of the rewrite over the original's, in characters "
        "(reason not_longer); null: off")

    @property
    def needs_embeddings(self) -> bool:
        return self.enabled and self.min_similarity is not None

    def describe(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {**self._describe_text(),
                **({"unfaithful": self.min_similarity} if self.min_similarity is not None
                   else {}),
                **({"not_longer": self.min_length_ratio} if self.min_length_ratio is not None
                   else {})}

    def check(self, candidates: Sequence[Candidate], embed: Embed | None
              ) -> list[Failure | None]:
        if not self.enabled:
            return [None] * len(candidates)
        results: list[Failure | None] = []
        for c in candidates:
            failure = self._text_failure(c.text, c.template)
            ratio = len(fold_str(c.text)) / max(1, len(fold_str(c.source)))
            if failure is None and self.min_length_ratio is not None:
                if fold_str(c.text) == fold_str(c.source):
                    failure = "not_longer", _detail("unchanged: the original itself", c.text)
                elif ratio < self.min_length_ratio:
                    failure = "not_longer", _detail(
                        f"length ratio {ratio:.2f} < min_length_ratio {self.min_length_ratio}",
                        c.text)
            results.append(failure)
        if self.needs_embeddings:
            todo = [i for i, r in enumerate(results) if r is None]
            for i, cosine in zip(todo, _cosines([candidates[i] for i in todo], embed),
                                 strict=True):
                if cosine < self.min_similarity:  # type: ignore[operator]
                    results[i] = "unfaithful", _detail(
                        f"cosine {cosine:.3f} < min_similarity {self.min_similarity}",
                        candidates[i].text)
        return results


class NewInstructionChecks(RequestChecks):
    """expand, pair_expand: a request on the seed's task, yet new, and unlike its siblings."""

    min_similarity: float | None = Field(
        0.3, ge=-1, le=1, description="least embedding cosine to the seed instruction: on its "
        "task (reason off_task); null: off")
    max_similarity: float | None = Field(
        0.85, ge=-1, le=1, description="most embedding cosine to the seed: new, not a paraphrase "
        "(reason not_new); null: off")
    max_sibling_similarity: float | None = Field(
        0.9, ge=-1, le=1, description="most embedding cosine to an instruction kept earlier from "
        "the same seed (reason near_sibling); null: off")

    @property
    def needs_embeddings(self) -> bool:
        return self.enabled and any(v is not None for v in (
            self.min_similarity, self.max_similarity, self.max_sibling_similarity))

    def describe(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        bounds = {"off_task": self.min_similarity, "not_new": self.max_similarity,
                  "near_sibling": self.max_sibling_similarity}
        return {**self._describe_text(), **{k: v for k, v in bounds.items() if v is not None}}

    def check(self, candidates: Sequence[Candidate], embed: Embed | None
              ) -> list[Failure | None]:
        if not self.enabled:
            return [None] * len(candidates)
        results: list[Failure | None] = [
            None if c.kept else self._text_failure(c.text, c.template) for c in candidates]
        if not self.needs_embeddings:
            return results
        vectors, index = _vectors(candidates, embed)
        kept_by_group: dict[Any, list[int]] = {}
        for c in candidates:
            if c.kept:
                kept_by_group.setdefault(c.group, []).append(index[c.text])
        for i, c in enumerate(candidates):
            if c.kept or results[i] is not None:
                continue
            vector = vectors[index[c.text]]
            cosine = float(vectors[index[c.source]] @ vector)
            siblings = kept_by_group.setdefault(c.group, [])
            nearest = max((float(vectors[j] @ vector) for j in siblings), default=-1.0)
            if self.min_similarity is not None and cosine < self.min_similarity:
                results[i] = "off_task", _detail(
                    f"cosine to seed {cosine:.3f} < min_similarity {self.min_similarity}", c.text)
            elif self.max_similarity is not None and cosine > self.max_similarity:
                results[i] = "not_new", _detail(
                    f"cosine to seed {cosine:.3f} > max_similarity {self.max_similarity}", c.text)
            elif self.max_sibling_similarity is not None and \
                    nearest > self.max_sibling_similarity:
                results[i] = "near_sibling", _detail(
                    f"cosine to a sibling {nearest:.3f} > max_sibling_similarity "
                    f"{self.max_sibling_similarity}", c.text)
            else:
                siblings.append(index[c.text])  # later siblings are compared with it
        return results


class ResponseChecks(Checks):
    """respond, pair_expand: the response answers its instruction."""

    refusal: bool = Field(True, description="reject a refusal or apology (reason refusal)")
    max_echo_share: float | None = Field(
        0.6, ge=0, le=1, description="most share of the instruction's 3-word sequences that a "
        "response up to 3x its length repeats (reason echoes_instruction); null: off")
    max_similarity: float | None = Field(
        0.92, ge=-1, le=1, description="most embedding cosine between instruction and response: "
        "a restatement, not an answer (reason echoes_instruction); null: off")
    min_similarity: float | None = Field(
        0.2, ge=-1, le=1, description="least embedding cosine between instruction and response "
        "(reason off_topic); null: off")

    @property
    def needs_embeddings(self) -> bool:
        return self.enabled and (self.min_similarity is not None or
                                 self.max_similarity is not None)

    def describe(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        echo = [v for v in (self.max_echo_share, self.max_similarity) if v is not None]
        return {**({"refusal": True} if self.refusal else {}),
                **({"echoes_instruction": echo[0] if len(echo) == 1 else echo} if echo else {}),
                **({"off_topic": self.min_similarity} if self.min_similarity is not None else {})}

    def check(self, candidates: Sequence[Candidate], embed: Embed | None
              ) -> list[Failure | None]:
        if not self.enabled:
            return [None] * len(candidates)
        results: list[Failure | None] = []
        for c in candidates:
            failure: Failure | None = None
            if self.refusal and (found := refusal(c.text)):
                failure = "refusal", _detail(found, c.text)
            elif self.max_echo_share is not None and \
                    len(c.text) <= 3 * max(1, len(c.source)) and \
                    (share := echo_share(c.source, c.text)) > self.max_echo_share:
                failure = "echoes_instruction", _detail(
                    f"repeats {share:.0%} of the instruction > max_echo_share "
                    f"{self.max_echo_share}", c.text)
            results.append(failure)
        if self.needs_embeddings:
            todo = [i for i, r in enumerate(results) if r is None]
            on_topic = [replace(candidates[i], source=candidates[i].topic or
                                candidates[i].source) for i in todo]
            for i, cosine in zip(todo, _cosines(on_topic, embed), strict=True):
                if self.max_similarity is not None and cosine > self.max_similarity:
                    results[i] = "echoes_instruction", _detail(
                        f"cosine {cosine:.3f} > max_similarity {self.max_similarity}",
                        candidates[i].text)
                elif self.min_similarity is not None and cosine < self.min_similarity:
                    results[i] = "off_topic", _detail(
                        f"cosine {cosine:.3f} < min_similarity {self.min_similarity}",
                        candidates[i].text)
        return results


class PairChecks(Checks):
    """pair_expand: its new instruction as expand's, its new response as respond's."""

    instruction: NewInstructionChecks = Field(
        default_factory=NewInstructionChecks, description="checks of the new instruction")
    response: ResponseChecks = Field(
        default_factory=ResponseChecks, description="checks of the new response")

    @property
    def needs_embeddings(self) -> bool:
        return self.enabled and (self.instruction.needs_embeddings or
                                 self.response.needs_embeddings)

    def describe(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {**self.instruction.describe(), **self.response.describe()}
