"""LLMTaskRunner on one batch, with a scripted engine: retries, rejections, generated rows.
(The real model runs these paths in tests/test_augment_job.py.)"""

from __future__ import annotations

import pyarrow as pa
from scripted_runner import runner

from augment_ray.config.base import SamplingParams
from augment_ray.engines.base import Completion
from augment_ray.rows import derived_id
from augment_ray.steps.generation import Generation, GenerationRows
from augment_ray.tasks.expand import ExpandTask
from augment_ray.tasks.respond import RespondTask


class ScriptedEngine:
    """Answers prompts from a list, in call order; records the sampling of each call."""

    model_name = "scripted"

    def __init__(self, answers: list[str], finish: str = "stop") -> None:
        self.answers = list(answers)
        self.finish = finish
        self.calls: list[SamplingParams] = []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        return [Completion(self.answers.pop(0), 10, 5, self.finish) for _ in prompts]


def seed_table(*instructions: str | None, rejected_first: bool = False) -> pa.Table:
    n = len(instructions)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "instruction": list(instructions),
        "input": pa.nulls(n, pa.string()),
        "output": ["old"] * n,
        "topic": ["t"] * n,
        "source_id": [f"r{i}" for i in range(n)],
        "origin_step": ["input"] * n,
        "reject_step": pa.array(
            ["input" if rejected_first and i == 0 else None for i in range(n)], pa.string()),
        "reject_reason": pa.array(
            ["missing_instruction" if rejected_first and i == 0 else None for i in range(n)],
            pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


def test_unparsable_answer_is_retried_with_a_new_seed_then_rejected_with_raw_text():
    engine = ScriptedEngine(["", "<instruction>Name a blue fruit.</instruction>", "", "", ""])
    task = ExpandTask(native=False, n=1)
    table = seed_table("Name a red fruit.", "Say hi.")
    out = runner(task, engine, max_retries=2)(table).to_pylist()
    # call 1 answers both seeds (r0: empty, r1: good); r0 is retried twice, empty both times
    assert [c.seed for c in engine.calls] == [0, 1, 2]
    assert engine.calls[1].temperature >= 0.7
    created = [r for r in out if r["origin_step"] == "s"]
    assert len(out) == 4 and len(created) == 2
    ok = next(r for r in created if r["reject_reason"] is None)
    assert ok["instruction"] == "Name a blue fruit."
    assert ok["s_parent_id"] == "r1"
    assert ok["id"] == derived_id("r1", "s", 0)
    assert ok["source_id"] == "r1"
    assert ok["s_attempts"] == 1
    assert ok["topic"] is None  # seed-only columns are not copied onto new rows
    failed = next(r for r in created if r["reject_reason"] is not None)
    assert (failed["reject_step"], failed["reject_reason"]) == ("s", "empty_output")
    assert failed["s_attempts"] == 3
    assert failed["s_parent_id"] == "r0"
    seeds = [r for r in out if r["origin_step"] == "input"]
    assert all(r["reject_reason"] is None for r in seeds)


def test_seeds_can_be_dropped_to_rejects_and_rejected_rows_pass_through():
    engine = ScriptedEngine(["<instruction>New one.</instruction>"])
    out = runner(ExpandTask(native=False, n=1), engine, keep_seeds=False)(
        seed_table(None, "Old one.", rejected_first=True)
    ).to_pylist()
    by_id = {r["id"]: r for r in out}
    assert by_id["r0"]["reject_reason"] == "missing_instruction"  # untouched, not prompted
    assert (by_id["r1"]["reject_step"], by_id["r1"]["reject_reason"]) == ("s", "seed_not_kept")
    assert by_id[derived_id("r1", "s", 0)]["instruction"] == "New one."


def test_respond_keeps_the_old_response_and_rejects_truncated_answers():
    engine = ScriptedEngine(["Paris."], finish="stop")
    out = runner(RespondTask("instruction", "s_previous_output"), engine)(
        seed_table("Capital of France?")
    ).to_pylist()[0]
    assert (out["output"], out["s_previous_output"]) == ("Paris.", "old")
    assert out["s_completion_tokens"] == 5

    engine = ScriptedEngine(["The capital of Fra"], finish="length")
    out = runner(RespondTask("instruction", "s_previous_output"), engine,
                 reject_truncated=True)(seed_table("Capital of France?")).to_pylist()[0]
    assert (out["reject_step"], out["reject_reason"]) == ("s", "truncated")
    assert out["reject_detail"] == "The capital of Fra"
    assert out["output"] == "old"  # a rejected answer never replaces the row's text


def test_new_rows_fit_a_block_whose_lineage_column_ray_typed_null():
    # a block in which no row had a parent yet: Ray Data infers the column's type as null
    out = GenerationRows("expand", "v", "m", ExpandTask(False, 1), SamplingParams())
    seeds = pa.table({"id": ["a"], "source_id": ["a"], "origin_step": ["input"],
                      "instruction": ["Write a poem."], "expand_parent_id": pa.nulls(1)})
    seeds = out.with_new_columns(seeds)
    assert seeds.schema.field("expand_parent_id").type == pa.string()
    generation = Generation(0, 0, [], attempts=1,
                            completion=Completion("Write a haiku.", 3, 4, "stop"),
                            values={"instruction": "Write a haiku."})
    table = out.with_new_rows(seeds, {0: seeds.to_pylist()[0]}, [generation])
    assert table["expand_parent_id"].to_pylist() == [None, "a"]


def test_a_rejected_new_row_fits_a_block_whose_reject_columns_ray_typed_null():
    # a block in which no row was rejected yet: its reject columns have type null
    out = GenerationRows("expand", "v", "m", ExpandTask(False, 1), SamplingParams())
    seeds = pa.table({"id": ["a"], "source_id": ["a"], "origin_step": ["input"],
                      "instruction": ["Write a poem."], "reject_step": pa.nulls(1),
                      "reject_reason": pa.nulls(1), "reject_detail": pa.nulls(1)})
    seeds = out.with_new_columns(seeds)
    generation = Generation(0, 0, [], attempts=3, failure=("unparseable", "Sure! Here"))
    table = out.with_new_rows(seeds, {0: seeds.to_pylist()[0]}, [generation])
    assert table["reject_reason"].to_pylist() == [None, "unparseable"]
    assert table["reject_detail"].to_pylist() == [None, "Sure! Here"]
    assert table.schema.field("reject_step").type == pa.string()
