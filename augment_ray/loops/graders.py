"""Grading a student's answer against a seed's reference answer, and the near-duplicate check
of new examples against every row so far."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from augment_ray.curate import minhash
from augment_ray.curate.confidence import answer_similarity, final_number, numbers_match
from augment_ray.curate.text import fold
from augment_ray.loops.config import GraderSpec, LoopDedupSpec
from augment_ray.tasks.llm2llm import find_label


def grade(prediction: str | None, reference: str | None, spec: GraderSpec,
          verdict: str | None = None) -> tuple[bool, str]:
    """(correct, why) for one answer. llm_judge reads the judge's verdict ('yes'/'no')."""
    if not prediction or not prediction.strip():
        return False, "no answer"
    if spec.kind == "llm_judge":
        if verdict is None:
            return False, "judge gave no verdict"
        return verdict == "yes", f"judge: {verdict}"
    reference = reference or ""
    if spec.kind == "final_number":
        expected, got = final_number(reference), final_number(prediction)
        if expected is None:
            return False, "reference has no final number"
        shown = "none" if got is None else f"{got:g}"
        return numbers_match(got, expected), f"expected {expected:g}, got {shown}"
    if spec.kind == "exact":
        correct = answer_similarity(prediction, reference, "exact") == 1.0
        return correct, "exact match" if correct else "differs"
    labels = spec.labels or []
    expected_label, got_label = find_label(reference, labels), find_label(prediction, labels)
    return (expected_label is not None and got_label == expected_label,
            f"expected {expected_label}, got {got_label}")


class NearDuplicateIndex:
    """MinHash signatures of every instruction so far; a new one whose estimated Jaccard with
    any of them reaches the threshold is a near duplicate. Brute force (new x all): meant for
    LLM2LLM's seed-scale sets (thousands to tens of thousands of rows)."""

    def __init__(self, spec: LoopDedupSpec) -> None:
        self.spec = spec
        self.perms = minhash.Permutations.make(spec.num_perm, seed=1)
        self.ids: list[str] = []
        self.signatures = np.zeros((0, spec.num_perm), dtype=np.uint32)

    def _signatures(self, texts: list[str | None]) -> np.ndarray:
        folded = fold(pa.array([t or "" for t in texts], pa.string()))
        hashes, rows = minhash.shingle_hashes(folded, "char", self.spec.shingle_size)
        return minhash.signatures(hashes, rows, len(texts), self.perms)

    def add(self, ids: list[str], texts: list[str | None]) -> None:
        self.ids += ids
        self.signatures = np.concatenate([self.signatures, self._signatures(texts)])

    def nearest(self, text: str | None) -> tuple[str | None, float]:
        """The most similar row so far and its estimated Jaccard."""
        if not self.ids:
            return None, 0.0
        signature = self._signatures([text])
        similarity = (self.signatures == signature).mean(axis=1)
        best = int(np.argmax(similarity))
        return self.ids[best], float(similarity[best])

    def admit(self, row_id: str, text: str | None) -> tuple[bool, str]:
        """Adds the row unless it nearly duplicates one so far: (admitted, why not)."""
        other, similarity = self.nearest(text)
        if other is not None and similarity >= self.spec.threshold:
            return False, f"near duplicate of {other} (estimated Jaccard {similarity:.2f})"
        self.add([row_id], [text])
        return True, ""
