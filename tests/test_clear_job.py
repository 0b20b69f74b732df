"""CLEAR on a real local Ray: logprobs from the real bundled model, the dataset-wide median
threshold across shards, and score -> auto_filter / auto_correct jobs with the real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.base import SamplingParams
from augment_ray.config.job import parse_job
from augment_ray.engines.transformers_engine import TransformersEngineSpec
from augment_ray.errors import InputDataError
from augment_ray.pipeline import run_job
from augment_ray.summary import format_summary

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "jobs" / "data" / "eval" / "gsm8k_test_200.jsonl"


def read_rows(path: Path) -> list[dict]:
    rows: list[dict] = []
    for file in sorted(path.glob("*.parquet")):  # data and rejects may differ in schema
        rows += pq.read_table(file).to_pylist()
    return rows


def write_shards(folder: Path, shards: list[list[dict]]) -> None:
    folder.mkdir(parents=True)
    for k, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{k}.parquet")


def gsm8k_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    return [{"id": f"g{i}", "instruction": r["question"], "output": r["answer"]}
            for i, r in enumerate(rows)]


@pytest.mark.integration
def test_transformers_engine_logprobs_match_a_plain_forward_pass():
    import torch

    from augment_ray.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(TransformersEngineSpec())
    messages = [{"role": "user", "content": "Is 7 a prime number? Reply with Yes or No only."}]
    result = engine.generate([messages], SamplingParams(max_tokens=4, logprobs=5))[0]
    assert len(result.logprobs) == result.completion_tokens
    for step in result.logprobs:
        assert 1 <= len(step) <= 5
        assert all(value <= 0.0 for value in step.values())
        assert sum(math.exp(v) for v in step.values()) <= 1.0 + 1e-6
    # greedy: the text starts with the most likely first token
    first = max(result.logprobs[0], key=result.logprobs[0].__getitem__)
    assert result.text.startswith(first.strip())
    # the same numbers as one forward pass of the model over the prompt
    ids = engine.tokenizer(engine.render(messages), add_special_tokens=False,
                           return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, -1].float()
    expected = torch.topk(torch.log_softmax(logits, -1), 5)
    got = sorted(result.logprobs[0].values(), reverse=True)
    assert got == pytest.approx(expected.values.tolist(), abs=1e-3)


def confidence_job(tmp_path: Path, **step) -> dict:
    return {
        "name": "threshold",
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "steps": [{"kind": "auto_filter", **step}],
    }


def test_auto_filter_median_is_global_not_per_block(local_ray, tmp_path):
    # three shards whose own medians (0.2, 0.5, 0.9) all differ from the global one
    values = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.55, 0.6], [0.8, 0.9, 1.0]]
    shards = [[{"id": f"s{k}-{i}", "instruction": f"q{k}{i}", "output": "a",
                "score_confidence": v} for i, v in enumerate(shard)]
              for k, shard in enumerate(values)]
    shards[1].append({"id": "unscored", "instruction": "q", "output": "a",
                      "score_confidence": None})
    write_shards(tmp_path / "in", shards)
    median = float(np.median([v for shard in values for v in shard]))  # 0.525

    summary = run_job(parse_job(confidence_job(tmp_path)))

    kept = read_rows(tmp_path / "out" / "data")
    rejected = read_rows(tmp_path / "out" / "_rejects")
    assert sorted(r["score_confidence"] for r in kept) == [0.55, 0.6, 0.8, 0.9, 1.0]
    low = [r for r in rejected if r["reject_reason"] == "low_confidence"]
    assert sorted(r["score_confidence"] for r in low) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert all(f"threshold {median:.4f} (median of 10 rows)" in r["reject_detail"] for r in low)
    assert [r["id"] for r in rejected if r["reject_reason"] == "missing_confidence"] == \
        ["unscored"]
    step = next(s for s in summary["steps"] if s["name"] == "auto_filter")
    assert step["threshold"] == pytest.approx(median)
    assert step["rows_in"] == 11 and step["rows_out"] == 5
    assert f"in       11  out        5  threshold {median:.4f} (median of 10 rows)" \
        in format_summary(summary)
    assert summary["rows_out"] + summary["rows_rejected"] == 11


def test_auto_filter_quantile_and_absolute_thresholds(local_ray, tmp_path):
    rows = [{"id": f"r{i:02d}", "instruction": f"q{i}", "output": "a",
             "score_confidence": i / 20} for i in range(20)]
    write_shards(tmp_path / "in", [rows[:7], rows[7:]])
    run_job(parse_job(confidence_job(tmp_path, quantile=0.25)))
    cut = float(np.quantile([r["score_confidence"] for r in rows], 0.25))
    kept = read_rows(tmp_path / "out" / "data")
    assert sorted(r["id"] for r in kept) == [r["id"] for r in rows if r["score_confidence"] >= cut]

    job = confidence_job(tmp_path, threshold=0.9)
    job["output"]["mode"] = "overwrite"
    run_job(parse_job(job))
    assert sorted(r["id"] for r in read_rows(tmp_path / "out" / "data")) == ["r18", "r19"]


def test_auto_filter_keeps_rows_tied_at_the_median_and_says_so(local_ray, tmp_path):
    values = [0.0] * 6 + [0.5, 1.0, 1.0]  # coarse scores: the median is 0.0
    write_shards(tmp_path / "in", [[{"id": f"r{i}", "instruction": f"q{i}", "output": "a",
                                     "score_confidence": v} for i, v in enumerate(values)]])
    summary = run_job(parse_job(confidence_job(tmp_path)))
    step = next(s for s in summary["steps"] if s["name"] == "auto_filter")
    assert step["threshold"] == 0.0 and step["rows_at_threshold"] == 6
    assert step["rows_out"] == 9
    assert "threshold 0.0000 (median of 9 rows, 6 rows at it, kept)" in format_summary(summary)


def test_auto_filter_without_a_confidence_column_is_a_clear_error(local_ray, tmp_path):
    write_shards(tmp_path / "in", [[{"instruction": "q", "output": "a"}]])
    with pytest.raises(InputDataError, match="put a `score` step before it"):
        run_job(parse_job(confidence_job(tmp_path)))


def example_job(tmp_path: Path, name: str, rows: list[dict]) -> dict:
    write_shards(tmp_path / "in", [rows[: len(rows) // 2], rows[len(rows) // 2:]])
    data = yaml.safe_load((ROOT / "jobs" / name).read_text())
    data["input"]["uri"] = str(tmp_path / "in")
    data["output"]["uri"] = str(tmp_path / "out")
    for engine in data["engines"].values():
        engine["num_cpus"] = 0.5
    return data


@pytest.mark.integration
def test_score_then_auto_filter_with_the_real_model(local_ray, tmp_path):
    rows = gsm8k_rows(6)
    rows[0]["output"], rows[1]["output"] = rows[1]["output"], rows[0]["output"]
    rows[2]["output"] = "   "  # cannot be judged: rejected, not dropped
    data = example_job(tmp_path, "auto_filter.yaml", rows)
    data["steps"][0]["methods"] = ["p_yes", "self_reflection"]
    data["steps"][0]["judge_max_tokens"] = 4

    summary = run_job(parse_job(data))

    kept = read_rows(tmp_path / "out" / "data")
    rejected = read_rows(tmp_path / "out" / "_rejects")
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in rows)
    assert [r["id"] for r in rejected if r["reject_reason"] == "missing_response"] == ["g2"]
    scored = [r for r in kept + rejected if r["score_confidence"] is not None]
    assert len(scored) == 5
    for row in scored:
        assert 0.0 <= row["score_p_yes"] <= 1.0
        assert row["score_confidence"] == pytest.approx(
            (row["score_p_yes"] + row["score_self_reflection"]) / 2
            if row["score_self_reflection"] is not None else row["score_p_yes"])
        assert row["score_model"] == "SmolLM2-135M-Instruct"
        assert row["score_prompt_tokens"] > 0
    median = float(np.median([r["score_confidence"] for r in scored]))
    assert sorted(r["id"] for r in kept) == sorted(
        r["id"] for r in scored if r["score_confidence"] >= median)
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["score"]["completion_tokens"] > 0
    assert steps["auto_filter"]["threshold"] == pytest.approx(median)


@pytest.mark.integration
def test_score_then_auto_correct_with_the_real_model(local_ray, tmp_path):
    rows = gsm8k_rows(6)
    data = example_job(tmp_path, "auto_correct.yaml", rows)
    data["engines"]["small"]["sampling"]["max_tokens"] = 24
    data["steps"][1]["eta"] = 0.5  # so that some candidates pass with the tiny judge

    summary = run_job(parse_job(data))

    kept = read_rows(tmp_path / "out" / "data")
    rejected = read_rows(tmp_path / "out" / "_rejects")
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in rows)
    originals = {r["id"]: r["output"] for r in rows}
    step = next(s for s in summary["steps"] if s["name"] == "auto_correct")
    below = [r for r in kept + rejected if r["score_confidence"] < step["threshold"]]
    assert below, "the median leaves rows below it"
    for row in below:  # each got a candidate and a verdict
        assert row["auto_correct_candidate"]
        assert row["auto_correct_better_confidence"] is not None
        if row.get("reject_reason") is None:
            assert row["auto_correct_corrected"] is True
            assert row["auto_correct_better_confidence"] >= 0.5
            assert row["output"] == row["auto_correct_candidate"]
            assert row["auto_correct_original_output"] == originals[row["id"]]
        else:
            assert row["reject_reason"] == "not_corrected"
            assert row["output"] == originals[row["id"]]
    for row in kept:
        if row["score_confidence"] >= step["threshold"]:
            assert row["auto_correct_corrected"] is False
            assert row["output"] == originals[row["id"]]
