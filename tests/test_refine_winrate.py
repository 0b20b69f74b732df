"""benchmarks/refine_winrate.py: verdict parsing and scoring, engine file errors, and a smoke
run of the whole harness with the real bundled model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from augment_ray.errors import JobSpecError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "refine_winrate.py"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("refine_winrate", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("reply", "verdict"), [
    ("A", "A"), (" b.", "B"), ("C", "C"), ("[[B]]", "B"), ("**A**", "A"),
    ("A is better because it is complete.", "A"), ("B\nAnswer B covers more.", "B"),
    ("Answer B is better.", "B"), ("The verdict: C", "C"), ("Output (A)", "A"),
    ("It's a tie.", "C"), ("Both are equally good", "C"),
    ("A good answer would mention the beaches", None), ("[Question]\nCompose a", None),
    ("", None),
])
def test_parse_verdict(harness: ModuleType, reply: str, verdict: str | None) -> None:
    assert harness.parse_verdict(reply) == verdict


def test_both_orders_must_agree(harness: ModuleType) -> None:
    q = [{"id": f"q{i}", "category": "c", "instruction": "?"} for i in range(5)]
    pairs = [(x, "orig", "new") for x in q]
    # original_first: A = original; refined_first: A = refined
    by_order = {"original_first": ["B", "A", "A", "C", "nonsense"],
                "refined_first": ["A", "B", "A", "C", "A"]}
    scored = harness.score(pairs, by_order)
    assert (scored["wins"], scored["losses"], scored["ties"]) == (1, 1, 3)
    assert scored["position_consistency_rate"]["successes"] == 3  # q0, q1, q3
    assert scored["votes"]["original_first"]["unparsable"] == 1
    assert scored["unparsable_verdicts"] == 1
    assert scored["position_a_share_of_decisive_votes"]["successes"] == 5
    assert [r["result"] for r in scored["rows"]] == ["win", "loss", "tie", "tie", "tie"]


def test_wilson_interval(harness: ModuleType) -> None:
    assert harness.wilson(0, 0) is None
    low, high = harness.wilson(40, 80)
    assert low == pytest.approx(0.3930, abs=1e-4) and high == pytest.approx(0.6070, abs=1e-4)
    assert harness.wilson(0, 3)[0] == 0.0 and harness.wilson(3, 3)[1] == 1.0


def test_engines_file_errors_are_the_projects(harness: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "engines.yaml"
    bad.write_text("engines:\n  judge: {kind: openai, model: m}\n")
    with pytest.raises(JobSpecError, match=r"engines\.judge\.base_url"):
        harness.load_engines(bad)
    bad.write_text("engines:\n  teacher: {kind: transformers}\n")
    with pytest.raises(JobSpecError, match="unknown role"):
        harness.load_engines(bad)
    good = tmp_path / "good.yaml"
    good.write_text("engines:\n  judge: {kind: openai, base_url: 'http://127.0.0.1:9/v1', "
                    "model: m}\n")
    raw, specs = harness.load_engines(good)
    assert specs["judge"].kind == "openai" and specs["refine"].model == "bundled"
    assert raw["answer"] == harness.DEFAULT_ENGINE


@pytest.mark.integration
def test_smoke_run_with_the_bundled_model(tmp_path: Path) -> None:
    from augment_ray.tasks.refine import RefineStepSpec

    # the refine step's checks reject most 8-token rewrites of the 135M model; without them
    # every question reaches the answer and judge engines
    unchecked = "checks" in RefineStepSpec.model_fields
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--questions", "3", "--max-tokens", "8", "--out", str(out),
         *(["--refine-option", "checks=false"] if unchecked else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == json.loads(run.stdout)
    assert result["n"] == 3
    refinements = result["refinements"]
    assert refinements["kept"] + refinements["rejected"] == 3
    assert sum(refinements["rejected_by_reason"].values()) == refinements["rejected"]
    judged = result["judged"]
    assert judged == refinements["kept"] - result["answers"]["questions_failed"]
    assert judged > 0, result["refinements"]
    assert result["wins"] + result["ties"] + result["losses"] == judged
    assert result["win_rate"]["n"] == judged
    if judged:
        low, high = result["win_rate"]["ci95_wilson"]
        assert 0.0 <= low <= result["win_rate"]["value"] <= high <= 1.0
    for order in ("original_first", "refined_first"):
        assert sum(result["votes"][order].values()) == judged
        assert sum(result["votes_as"][order].values()) == judged
    assert result["unparsable_verdicts"] == sum(v["unparsable"]
                                                for v in result["votes"].values())
    assert 0 <= result["position_consistency_rate"]["successes"] <= judged
    assert sum(c["judged"] for c in result["by_category"].values()) == judged
    assert set(result["engines"]) == {"refine", "answer", "judge"}
    assert all(e["default_bundled"] for e in result["engines"].values())
    assert result["engines"]["answer"]["sampling"]["max_tokens"] == 8
    for key in ("refine_job_seconds", "answer_seconds", "judge_seconds", "total_seconds"):
        assert result["timings"][key] > 0
