"""Diversity figures (augment_ray/curate/diversity.py): the metrics on vectors whose answer is
known, the real bundled embedder on a few texts, and the per-step pass over a written output."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.curate import diversity
from augment_ray.curate.diversity import (
    add_diversity,
    checks_passed,
    mean_cosine_distance,
    step_diversity,
    vendi_score,
)
from augment_ray.storage import Location


def reference_vendi(x: np.ndarray) -> float:
    """The definition, literally: the n x n cosine kernel's eigenvalues / n."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(x @ x.T / len(x))
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def reference_distance(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    return float(np.mean([1 - x[i] @ x[j] for i in range(n) for j in range(n) if i != j]))


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_identical_vectors_are_one_text(n: int) -> None:
    x = np.tile([0.3, -1.2, 0.5, 2.0], (n, 1))
    assert vendi_score(x) == pytest.approx(1.0)
    assert mean_cosine_distance(x) == (None if n == 1 else pytest.approx(0.0, abs=1e-12))


@pytest.mark.parametrize("n", [1, 3, 16, 64])
def test_orthogonal_vectors_are_n_texts(n: int) -> None:
    x = np.eye(64)[:n] * 3.0  # any length: the kernel is cosine
    assert vendi_score(x) == pytest.approx(n)
    assert mean_cosine_distance(x) == (None if n == 1 else pytest.approx(1.0))


def test_clusters_and_opposites() -> None:
    # k copies each of m orthogonal directions: m effective texts
    x = np.repeat(np.eye(5)[:3], 4, axis=0)
    assert vendi_score(x) == pytest.approx(3.0)
    # 12 rows in 3 clusters of 4: of the 132 ordered pairs, the 96 across clusters are at 1
    assert mean_cosine_distance(x) == pytest.approx((12 * 8) / (12 * 11))
    # opposite vectors have cosine -1: distance 2
    assert mean_cosine_distance(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)


@pytest.mark.parametrize("shape", [(40, 8), (8, 40), (257, 384)])
def test_random_vectors_match_the_definition(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(1).normal(size=shape)
    assert vendi_score(x) == pytest.approx(reference_vendi(x), rel=1e-9)
    assert mean_cosine_distance(x) == pytest.approx(reference_distance(x), rel=1e-9)
    assert 1.0 <= vendi_score(x) <= min(shape)


def test_empty_and_degenerate_sets() -> None:
    assert vendi_score(np.zeros((0, 4))) is None
    assert mean_cosine_distance(np.zeros((0, 4))) is None
    assert vendi_score(np.zeros((3, 4))) is None  # no direction at all
    assert diversity.diversity_of(np.zeros((0, 4))) == {
        "n": 0, "mean_cosine_distance": None, "vendi": None}
    with pytest.raises(ValueError, match="n x d"):
        vendi_score(np.zeros(4))


def test_share_passing_each_check() -> None:
    generating = {"name": "expand", "rows_in": 10, "rows_created": 40,
                  "rejected": {"semantic_drift": 4, "not_new": 10, "unparsable": 2},
                  "checks": {"semantic_drift": 0.35, "not_new": 0.9, "refusal": True},
                  "diversity": {"input": "instruction", "output": "instruction",
                                "new_rows": True}}
    assert checks_passed(generating) == {"semantic_drift": 0.9, "not_new": 0.75, "refusal": 1.0}
    annotating = {"name": "refine", "rows_in": 8, "rows_created": 0,
                  "rejected": {"semantic_drift": 2}, "checks": {"semantic_drift": 0.5},
                  "diversity": {"input": "instruction", "output": "refined_instruction",
                                "new_rows": False}}
    assert checks_passed(annotating) == {"semantic_drift": 0.75}
    # no `checks` key (a summary of before the checks), no rows checked: no shares
    assert checks_passed({**annotating, "checks": None}) is None
    assert checks_passed({k: v for k, v in annotating.items() if k != "checks"}) is None
    assert checks_passed({**annotating, "rows_in": 0}) is None


# ---------------------------------------------------------------------------- the real embedder


PARAPHRASES = ["Write a poem about the sea.", "Write a short poem about the ocean.",
               "Compose a poem about the sea.", "Write a poem about the seaside."]
VARIED = ["Write a poem about the sea.", "What is the capital of Peru?",
          "Sort this list of numbers in Python.", "Explain how vaccines train the immune system."]


def test_the_bundled_embedder_scores_paraphrases_below_varied_texts() -> None:
    embed, model = diversity.default_embedder()
    assert model == "all-MiniLM-L6-v2"
    same, varied = embed(PARAPHRASES), embed(VARIED)
    assert same.shape == (4, 384) and same.dtype == np.float32
    assert np.allclose(np.linalg.norm(varied, axis=1), 1.0, atol=1e-5)
    assert 1.0 < vendi_score(same) < 2.0 < vendi_score(varied) <= 4.0
    assert mean_cosine_distance(same) < 0.4 < mean_cosine_distance(varied)
    assert diversity.default_embedder() is diversity.default_embedder()  # loaded once


def _rows(*specs: tuple) -> list[dict]:
    keys = ("id", "origin_step", "instruction", "refined_instruction", "reject_step")
    return [dict(zip(keys, spec, strict=True)) for spec in specs]


def written_output(root: Path) -> tuple[list[str], list[str]]:
    """Shards as a run of input -> refine -> expand -> filter writes them."""
    kept = _rows(("s1", "input", PARAPHRASES[0], "Write a sea poem.", None),
                 ("s2", "input", VARIED[1], "Name Peru's capital.", None),
                 ("c1", "expand", "Write a poem about rivers.", None, None),
                 ("c2", "expand", "List three rivers in Peru.", None, None),
                 ("c3", "expand", "Write a poem about lakes.", None, None))
    rejected = _rows(
        ("s3", "input", VARIED[2], "Sort numbers.", "filter"),  # reached both steps
        ("s4", "input", "   ", None, "input"),  # rejected on read: reached neither
        ("c4", "expand", "Write a poem about the sea!", None, "expand"))  # a failed check
    schema = pa.schema([(k, pa.string()) for k in kept[0]])
    (root / "data").mkdir(parents=True)
    (root / "_rejects").mkdir()
    pq.write_table(pa.Table.from_pylist(kept[:3], schema), root / "data" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(kept[3:], schema), root / "data" / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(rejected, schema), root / "_rejects" / "part-0.parquet")
    return ["data/part-0.parquet", "data/part-1.parquet"], ["_rejects/part-0.parquet"]


STEPS = [
    {"name": "input", "kind": "read", "rows_in": 4, "rows_out": 3, "rejected": {"x": 1}},
    {"name": "refine", "kind": "refine", "rows_in": 3, "rows_created": 0, "rows_out": 3,
     "rejected": {}, "diversity": {"input": "instruction", "output": "refined_instruction",
                                   "new_rows": False}},
    {"name": "expand", "kind": "expand", "rows_in": 3, "rows_created": 4, "rows_out": 6,
     "rejected": {"not_new": 1}, "checks": {"not_new": 0.9, "refusal": True},
     "diversity": {"input": "instruction", "output": "instruction", "new_rows": True}},
    {"name": "filter", "kind": "filter", "rows_in": 6, "rows_created": 0, "rows_out": 5,
     "rejected": {"min_chars": 1}},
]


class Recorder:
    """Stands in for the embedder: remembers what it was asked, answers one-hot vectors."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return np.eye(len(texts), dtype=np.float32)


def test_each_step_is_measured_on_its_own_rows(tmp_path: Path) -> None:
    data, rejects = written_output(tmp_path)
    seen = Recorder()
    figures = step_diversity(Location(str(tmp_path)), data, rejects, STEPS, sample=256,
                             embedder=(seen, "one-hot"))
    assert set(figures) == {"refine", "expand"}
    # refine: the three input rows it got (s3 rejected later counts) vs the two kept refined
    # ones, cut to the same size; expand: the same three seeds vs its three kept new rows
    assert figures["refine"]["inputs"]["n"] == figures["refine"]["outputs"]["n"] == 2
    assert figures["expand"]["inputs"]["n"] == figures["expand"]["outputs"]["n"] == 3
    assert figures["expand"]["embedder"] == "one-hot"
    # one-hot vectors: every distinct text is its own direction
    assert figures["expand"]["outputs"] == {"n": 3, "mean_cosine_distance": 1.0, "vendi": 3.0}
    embedded = set(seen.texts)
    assert len(seen.texts) == len(embedded)  # each distinct text once
    assert {"Write a poem about rivers.", "List three rivers in Peru.",
            "Write a poem about lakes."} <= embedded
    assert "Write a poem about the sea!" not in embedded  # rejected: not an output
    assert not embedded & {"Sort numbers.", "   "}  # s3's refined text was not kept; s4 blank
    assert embedded <= {VARIED[2], PARAPHRASES[0], VARIED[1], "Write a sea poem.",
                        "Name Peru's capital.", "Write a poem about rivers.",
                        "List three rivers in Peru.", "Write a poem about lakes."}


def test_the_sample_is_seeded_and_capped(tmp_path: Path) -> None:
    data, rejects = written_output(tmp_path)
    runs = [step_diversity(Location(str(tmp_path)), data, rejects, STEPS, sample=2,
                           embedder=(Recorder(), "one-hot")) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["expand"]["inputs"]["n"] == runs[0]["expand"]["outputs"]["n"] == 2


def test_add_diversity_with_the_real_embedder(tmp_path: Path) -> None:
    data, rejects = written_output(tmp_path)
    steps = [dict(step) for step in STEPS]
    add_diversity(steps, Location(str(tmp_path)), {"files": data, "reject_files": rejects})
    expand = steps[2]
    assert expand["checks_passed"] == {"not_new": 0.75, "refusal": 1.0}
    assert expand["diversity"]["new_rows"] is True and expand["diversity"]["input"] == \
        "instruction"
    for name in ("refine", "expand"):
        entry = next(s for s in steps if s["name"] == name)
        for side in ("inputs", "outputs"):
            figures = entry["diversity"][side]
            assert figures["n"] >= 2 and 1.0 <= figures["vendi"] <= figures["n"]
            assert 0.0 < figures["mean_cosine_distance"] < 1.5
        assert entry["diversity"]["embedder"] == "all-MiniLM-L6-v2"
    assert "diversity" not in steps[3] and "checks_passed" not in steps[1]


def test_a_failing_embedder_never_fails_the_run(tmp_path: Path, monkeypatch, caplog) -> None:
    data, rejects = written_output(tmp_path)

    def broken() -> None:
        raise OSError("no model here\nsecond line")

    monkeypatch.setattr(diversity, "default_embedder", broken)
    steps = [dict(step) for step in STEPS]
    with caplog.at_level(logging.WARNING, logger="augment_ray.curate.diversity"):
        add_diversity(steps, Location(str(tmp_path)), {"files": data, "reject_files": rejects})
    assert "Diversity figures left out of the summary: OSError: no model here" in caplog.text
    assert steps[1]["diversity"] == STEPS[1]["diversity"]  # the columns only, as before
    assert steps[2]["checks_passed"] == {"not_new": 0.75, "refusal": 1.0}  # no model needed
    # a missing shard, too, is a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="augment_ray.curate.diversity"):
        add_diversity(steps, Location(str(tmp_path)), {"files": ["data/gone.parquet"]})
    assert "Diversity figures left out" in caplog.text


def test_sample_zero_turns_it_off(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(diversity, "default_embedder", lambda: pytest.fail("embedder loaded"))
    steps = [dict(step) for step in STEPS]
    add_diversity(steps, Location(str(tmp_path)), {"files": [], "reject_files": []}, sample=0)
    assert steps[1]["diversity"] == STEPS[1]["diversity"]
    assert steps[2]["checks_passed"] == {"not_new": 0.75, "refusal": 1.0}


def test_reading_stops_once_the_samples_are_full(tmp_path: Path) -> None:
    """A large output costs a few shards' reads: enough candidates from at least MIN_SHARDS
    shards, in a seeded order; a small one is read whole."""
    names = []
    (tmp_path / "data").mkdir()
    for k in range(20):
        rows = [{"origin_step": "input", "reject_step": None, "instruction": f"q {k} {i}",
                 "refined_instruction": f"r {k} {i}"} for i in range(50)]
        names.append(f"data/part-{k}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / names[-1])
    root = Location(str(tmp_path))
    sides = diversity.generating_sides(STEPS[:2], limit=4)
    assert diversity.sample_texts(root, names, [], sides) == diversity.MIN_SHARDS
    assert len(sides[0].inputs.texts) == len(sides[0].outputs.texts) == 4
    sides = diversity.generating_sides(STEPS[:2], limit=100)  # 800 candidates wanted
    assert diversity.sample_texts(root, names, [], sides) == 16
    sides = diversity.generating_sides(STEPS[:2], limit=1000)
    assert diversity.sample_texts(root, names, [], sides) == 20
    assert sides[0].inputs.seen == 1000 and len(sides[0].inputs.texts) == 1000
