"""LLM2LLM: graders on real GSM8K answers, teacher output validation, the near-duplicate check,
and the loop on a real local Ray with the real model (selection from seeds only, merging,
resume after a finished round and after an unfinished one)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.errors import JobSpecError
from augment_ray.loops.config import GraderSpec, LoopDedupSpec, load_loop_job, parse_loop_job
from augment_ray.loops.graders import NearDuplicateIndex, grade
from augment_ray.tasks.base import ParseFailure
from augment_ray.tasks.llm2llm import TeacherTask, find_label

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "jobs" / "data" / "eval" / "gsm8k_test_200.jsonl"
DEMO = ROOT / "jobs" / "loops" / "llm2llm_gsm8k.yaml"
NUMBER = GraderSpec(kind="final_number")


def gsm8k() -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()]


# ------------------------------------------------------------------ graders


def test_final_number_grader_on_real_gsm8k_answers():
    rows = gsm8k()
    rng = random.Random(0)
    for row in rows:
        answer = row["answer"]
        assert grade(answer, answer, NUMBER)[0], answer[-40:]
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        # a student that states the number in words around it is right
        assert grade(f"So the total is {final} dollars.", answer, NUMBER)[0]
        wrong = str(int(float(final)) + rng.choice([-3, -1, 1, 2, 7]))
        correct, detail = grade(f"The answer is {wrong}.", answer, NUMBER)
        assert not correct and detail.startswith(f"expected {float(final):g}")


def test_graders_exact_label_judge_and_empty_answers():
    assert grade("  Paris ", "paris", GraderSpec(kind="exact"))[0]
    assert not grade("Paris, France", "paris", GraderSpec(kind="exact"))[0]
    labels = GraderSpec(kind="label", labels=["spam", "not spam"])
    assert grade("This message is not spam.", "not spam", labels)[0]
    assert not grade("Spam!", "not spam", labels)[0]
    assert grade("spam", "Spam", labels)[0]
    judge = GraderSpec(kind="llm_judge", engine="e")
    assert grade("42", "#### 42", judge, verdict="yes") == (True, "judge: yes")
    assert grade("41", "#### 42", judge, verdict=None) == (False, "judge gave no verdict")
    assert grade("", "#### 42", NUMBER) == (False, "no answer")
    assert grade("7", "no number", NUMBER) == (False, "reference has no final number")


def test_find_label_prefers_the_whole_text_then_the_first_and_longest_label():
    labels = ["positive", "negative", "not positive"]
    assert find_label("Negative.", labels) == "negative"
    assert find_label("It is not positive at all", labels) == "not positive"
    assert find_label("positive, then negative", labels) == "positive"
    assert find_label("neutral", labels) is None
    # fullwidth NEGATIVE: folded as curate.text folds (NFKC, case)
    assert find_label("\uff2e\uff25\uff27\uff21\uff34\uff29\uff36\uff25", labels) == "negative"


# ------------------------------------------------------------------ teacher validation

SEED = {"instruction": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "output": "3 + 4 = 7\n#### 7"}


def test_teacher_accepts_tagged_and_labelled_examples():
    task = TeacherTask("math", 1)
    tagged = task.parse(SEED, "<question>Ann has 2 pens and buys 5. How many?</question>\n"
                              "<answer>2 + 5 = 7\n#### 7</answer>")
    assert tagged == {"instruction": "Ann has 2 pens and buys 5. How many?",
                      "output": "2 + 5 = 7\n#### 7"}
    labelled = task.parse(SEED, "Problem:\nBo has 1 cat and gets 2. How many?\n\nSolution:\n"
                                "1 + 2 = 3\n#### 3\n\nA question and answer about cats")
    assert labelled == {"instruction": "Bo has 1 cat and gets 2. How many?",
                        "output": "1 + 2 = 3\n#### 3"}


@pytest.mark.parametrize(("task", "text", "reason"), [
    (TeacherTask("math", 1), "Here is a new problem about apples.", "unparsable_example"),
    (TeacherTask("math", 1), "<question>Ann has 2 pens.</question><answer>She has 7.</answer>",
     "missing_final_answer"),
    (TeacherTask("math", 1), f"<question>{SEED['instruction']}</question><answer>#### 7</answer>",
     "copy_of_seed"),
    (TeacherTask("classification", 1, ["spam", "ham"]),
     "<question>Win money now</question><answer>phishing</answer>", "label_not_allowed"),
])
def test_teacher_rejects_invalid_examples_with_a_reason(task, text, reason):
    with pytest.raises(ParseFailure) as info:
        task.parse(SEED, text)
    assert info.value.reason == reason


def test_teacher_classification_answer_becomes_the_allowed_label():
    task = TeacherTask("classification", 2, ["spam", "ham"])
    parsed = task.parse(SEED, "<question>Cheap pills!!!</question><answer>Label: Spam.</answer>")
    assert parsed == {"instruction": "Cheap pills!!!", "output": "spam"}
    assert len(task.prompts(SEED)) == 2
    assert "Allowed labels: spam, ham" in task.prompts(SEED)[0][0]["content"]


def test_near_duplicate_index_rejects_copies_of_anything_so_far():
    rows = gsm8k()[:20]
    index = NearDuplicateIndex(LoopDedupSpec(threshold=0.8))
    index.add([f"s{i}" for i in range(20)], [r["question"] for r in rows])
    admitted, why = index.admit("n1", rows[3]["question"].upper() + " ")
    assert not admitted and why.startswith("near duplicate of s3")
    assert index.admit("n2", "A completely different question about trains and time?")[0]
    # accepted rows count as "so far" for the next ones
    admitted, why = index.admit("n3", "A completely different question about trains and time!")
    assert not admitted and "n2" in why


# ------------------------------------------------------------------ config


def test_demo_loop_job_is_valid():
    job = load_loop_job(DEMO)
    assert job.rounds == 2 and job.teacher.per_wrong == 1 and job.train is None


def test_loop_job_errors_name_the_field():
    data = yaml.safe_load(DEMO.read_text())
    data["teacher"]["engine"] = "big"
    with pytest.raises(JobSpecError, match=r"teacher.engine: 'big' is not an engine"):
        parse_loop_job(data)
    data = yaml.safe_load(DEMO.read_text())
    data["grader"] = {"kind": "label"}
    with pytest.raises(JobSpecError, match=r"grader: .*kind: label needs `labels`"):
        parse_loop_job(data)


# ------------------------------------------------------------------ the loop, real model


def read(path: Path) -> list[dict]:
    return pq.read_table(path / "part-00000.parquet").to_pylist() if path.exists() else []


def loop_job(tmp_path: Path, seeds: list[int], rounds: int, with_eval: bool) -> dict:
    lines = (ROOT / "jobs" / "data" / "llm2llm" / "seeds.jsonl").read_text().splitlines()
    (tmp_path / "seeds.jsonl").write_text("\n".join(lines[i] for i in seeds) + "\n")
    data = yaml.safe_load(DEMO.read_text())
    data["seeds"]["uri"] = str(tmp_path / "seeds.jsonl")
    data["output"]["uri"] = str(tmp_path / "out")
    data["rounds"] = rounds
    data["engines"]["small"]["sampling"]["max_tokens"] = 16
    # greedy: the same new examples on every run (the 135M teacher follows the format for
    # seeds 2, 10 and 14 of the sample, not for seed 0)
    data["teacher"]["sampling"] = {"temperature": 0.0, "max_tokens": 120}
    data["teacher"]["max_retries"] = 0
    if with_eval:
        eval_lines = (ROOT / "jobs" / "data" / "llm2llm" / "eval.jsonl").read_text()
        (tmp_path / "eval.jsonl").write_text("\n".join(eval_lines.splitlines()[:2]) + "\n")
        data["eval"]["uri"] = str(tmp_path / "eval.jsonl")
    else:
        data.pop("eval")
    return data


@pytest.mark.integration
def test_loop_rounds_select_only_seeds_and_merge_accepted_examples(local_ray, tmp_path):
    from augment_ray.loops.llm2llm import run_loop

    data = loop_job(tmp_path, seeds=[0, 2, 10, 14], rounds=2, with_eval=True)
    report = run_loop(parse_loop_job(data))
    assert report["rounds"][0]["accepted"] >= 1, "round 1 must train on generated rows"

    out = tmp_path / "out"
    seed_ids = {json.loads(line)["id"] for line in
                (tmp_path / "seeds.jsonl").read_text().splitlines()}
    assert (out / "_SUCCESS").exists()
    previous_train: list[dict] | None = None
    for r, figures in enumerate(report["rounds"]):
        folder = out / f"round={r:02d}"
        train = read(folder / "train")
        predictions = read(folder / "predictions")
        generated = read(folder / "generated")
        rejected = read(folder / "_rejects")
        # the student is evaluated on the original seeds only, never on generated rows
        assert sorted(p["id"] for p in predictions) == sorted(seed_ids)
        wrong = [p for p in predictions if not p["correct"]]
        assert figures["wrong"] == len(wrong)
        assert figures["seed_accuracy"] == pytest.approx((4 - len(wrong)) / 4, abs=1e-4)
        assert figures["eval_rows"] == 2
        assert len(read(folder / "eval_predictions")) == 2
        # m = 1 new example per wrong seed, each accepted or rejected with a reason
        assert figures["generated"] == len(wrong) == len(generated) + len(rejected)
        assert figures["accepted"] == len(generated)
        assert all(row["reject_reason"] for row in rejected)
        for row in generated + rejected:
            assert row["llm2llm_parent_id"] in {w["id"] for w in wrong}
            assert row["llm2llm_parent_id"] in seed_ids
        for row in generated:
            assert re.search(r"####\s*-?[\d.,]+", row["output"])
            assert row["llm2llm_round"] == r and row["origin_step"] == "teacher"
        if previous_train is not None:  # train_r = train_{r-1} + accepted of round r-1
            accepted_before = read(out / f"round={r - 1:02d}" / "generated")
            assert sorted(t["id"] for t in train) == sorted(
                [t["id"] for t in previous_train] + [g["id"] for g in accepted_before])
        previous_train = train
    final = read(out / "train")
    assert len(final) == report["final_train_rows"]
    assert {row["id"] for row in final} >= seed_ids
    assert len({row["id"] for row in final}) == len(final)


@pytest.mark.integration
def test_loop_resumes_after_the_last_finished_round(local_ray, tmp_path):
    from augment_ray.loops.llm2llm import run_loop

    data = loop_job(tmp_path, seeds=[0, 2], rounds=1, with_eval=False)
    first = run_loop(parse_loop_job(data))
    round0 = tmp_path / "out" / "round=00" / "predictions" / "part-00000.parquet"
    stamp = round0.stat().st_mtime_ns

    data["rounds"] = 2  # extend the finished run by one round
    second = run_loop(parse_loop_job(data))
    assert second["resumed_from_round"] == 1
    assert second["rounds"][0] == {**first["rounds"][0], "resumed": True}
    assert round0.stat().st_mtime_ns == stamp  # round 0 was not done again
    assert (tmp_path / "out" / "round=01" / "_DONE").exists()

    # a crash inside round 1 (no _DONE): the rerun does round 1 again, not round 0
    (tmp_path / "out" / "round=01" / "_DONE").unlink()
    (tmp_path / "out" / "_SUCCESS").unlink()
    third = run_loop(parse_loop_job(data))
    assert third["resumed_from_round"] == 1
    assert round0.stat().st_mtime_ns == stamp
    assert third["rounds"][1]["train_rows"] == second["rounds"][1]["train_rows"]

    data["teacher"]["per_wrong"] = 2  # another job: refused, not mixed
    with pytest.raises(Exception, match="holds a loop run of another job"):
        run_loop(parse_loop_job(data))


@pytest.mark.integration
def test_loop_runs_the_train_command_and_evaluates_the_model_it_wrote(local_ray, tmp_path):
    from augment_ray.engines.model_files import resolve_model_dir
    from augment_ray.loops.llm2llm import LoopError, run_loop

    bundled = resolve_model_dir("bundled", None)
    data = loop_job(tmp_path, seeds=[0], rounds=1, with_eval=False)
    # a stand-in trainer: a real subprocess that writes a model folder (a copy of the bundled
    # model) and notes which training set it was given
    (tmp_path / "models").mkdir()
    data["train"] = {
        "command": f"cp -r {bundled} {{model_dir}} && echo {{train_dir}} > "
                   "{model_dir}/trained_on.txt",
        "model_dir": str(tmp_path / "models" / "round-{round}"),
    }
    report = run_loop(parse_loop_job(data))
    model_dir = tmp_path / "models" / "round-0"
    assert report["rounds"][0]["train"] == "ran"
    assert report["rounds"][0]["student_model"] == str(model_dir)
    assert (model_dir / "trained_on.txt").read_text().strip() == \
        str(tmp_path / "out" / "round=00" / "train")
    predictions = read(tmp_path / "out" / "round=00" / "predictions")
    assert predictions[0]["student_model"] == str(model_dir)  # the student ran from there

    data["train"]["command"] = "exit 3"
    with pytest.raises(LoopError, match="the train command exited with 3"):
        run_loop(parse_loop_job(data), overwrite=True)


def test_cli_validates_loop_jobs_and_names_missing_sections(tmp_path):
    from click.testing import CliRunner

    from augment_ray.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(DEMO)])
    assert ok.exit_code == 0 and "valid loop job" in ok.output
    checked = runner.invoke(main, ["loop", str(DEMO), "--check"])
    assert checked.exit_code == 0 and "2 rounds" in checked.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: {uri: x}\noutput: {uri: y}\n")
    result = runner.invoke(main, ["loop", str(bad)])
    assert result.exit_code == 2
    assert "engines: Field required; student: Field required; teacher: Field required" in \
        result.output
