"""Decontamination against real eval sets (the bundled GSM8K and MT-Bench samples), eval set
loading from local files, folders and S3, and one whole job (filter -> decontaminate) on Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from augment_ray.config.base import NormalizeSpec, StorageOptions
from augment_ray.config.job import parse_job
from augment_ray.curate.decontaminate import (
    NgramIndex,
    best_matches,
    build_index,
    decontaminate_table,
)
from augment_ray.curate.hashing import hash64
from augment_ray.curate.text import fold
from augment_ray.errors import InputDataError, JobSpecError, StorageError
from augment_ray.pipeline import run_job
from augment_ray.steps.decontaminate import DecontaminateStep, DecontaminateStepSpec, EvalSetSpec

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "jobs" / "data" / "eval"
GSM8K = EvalSetSpec(uri=str(EVAL / "gsm8k_test_200.jsonl"), name="gsm8k_test")
MT_BENCH = EvalSetSpec(uri=str(EVAL / "mt_bench_questions.jsonl"), name="mt_bench",
                       columns=["turns"], id_column="question_id")
SEEDS = ROOT / "jobs" / "data" / "self_instruct_seed"


def eval_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


GSM8K_QUESTIONS = [row["question"] for row in eval_rows(EVAL / "gsm8k_test_200.jsonl")]
KYLAR = GSM8K_QUESTIONS[5]  # "Kylar went to the store to buy glasses for his new apartment. ..."
KYLAR_PARAPHRASE = KYLAR.replace("store", "shop").replace("new apartment", "new flat")
MT_BENCH_81 = eval_rows(EVAL / "mt_bench_questions.jsonl")[0]
SEED_INSTRUCTION = "What is the relation between the given pairs?"


@pytest.fixture(scope="module")
def index() -> NgramIndex:
    built, _ = build_index([GSM8K, MT_BENCH], n=8, step="decontaminate")
    return built


def rows(texts: list[str | None], **extra: list) -> pa.Table:
    n = len(texts)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "instruction": pa.array(texts, pa.string()),
        **extra,
        "reject_step": pa.nulls(n, pa.string()), "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


def verdicts(table: pa.Table, index: NgramIndex, threshold: float = 0.5,
             columns: tuple[str, ...] = ("instruction",)) -> list[tuple]:
    out = decontaminate_table(table, index, list(columns), threshold, "decontaminate")
    return [(r["reject_reason"], r["reject_detail"]) for r in out.to_pylist()]


# ------------------------------------------------------------------ real eval rows


def test_index_counts_items_and_ngrams_of_each_set():
    _, stats = build_index([GSM8K, MT_BENCH], n=8, step="decontaminate")
    assert [(s.name, s.items) for s in stats] == [("gsm8k_test", 200), ("mt_bench", 80)]
    assert 6000 < stats[0].ngrams < 10000  # ~46 words per question -> ~39 8-grams each
    assert 3000 < stats[1].ngrams < 6000


def test_copied_gsm8k_question_is_caught_through_case_and_whitespace(index):
    copied = "  " + KYLAR.upper().replace(" ", " \n\t ") + "  "
    assert verdicts(rows([copied]), index) == [
        ("contaminated", "100% (34 of 34) of the row's 8-grams match gsm8k_test item 5 "
                         "(threshold 50%)"),
    ]


def test_lightly_paraphrased_question_is_caught(index):
    assert KYLAR_PARAPHRASE != KYLAR
    [(reason, detail)] = verdicts(rows([KYLAR_PARAPHRASE]), index)
    assert reason == "contaminated"
    # 41 words, 34 8-grams; the 12 that span word 5 (store) or 12 (apartment) are lost
    assert detail == ("65% (22 of 34) of the row's 8-grams match gsm8k_test item 5 "
                      "(threshold 50%)")


def test_a_question_embedded_in_a_longer_prompt_counts_by_share(index):
    # W words of other text before the 41-word question: 34 of W + 34 8-grams match
    tutor = ("You are a careful tutor who explains every step slowly and checks the "
             "arithmetic twice before answering.")  # 17 words
    assert verdicts(rows([f"{tutor} {KYLAR}"]), index) == [
        ("contaminated", "67% (34 of 51) of the row's 8-grams match gsm8k_test item 5 "
                         "(threshold 50%)"),
    ]
    context = pq.read_table(SEEDS)["output"][0].as_py()  # a real answer of 52 words
    assert len(context.split()) > 34
    assert verdicts(rows([f"{context} {KYLAR}"]), index) == [(None, None)]


def test_unrelated_self_instruct_seeds_pass(index):
    seeds = pq.read_table(SEEDS)
    table = rows(seeds["instruction"].to_pylist(), input=seeds["input"])
    results = verdicts(table, index, columns=("instruction", "input"))
    assert len(results) == 175
    assert results == [(None, None)] * 175


def test_mt_bench_turns_each_count_for_their_question(index):
    first_turn, second_turn = MT_BENCH_81["turns"]
    assert MT_BENCH_81["question_id"] == 81
    assert verdicts(rows([first_turn, second_turn.lower(), SEED_INSTRUCTION]), index) == [
        ("contaminated", "100% (12 of 12) of the row's 8-grams match mt_bench item 81 "
                         "(threshold 50%)"),
        ("contaminated", "100% (4 of 4) of the row's 8-grams match mt_bench item 81 "
                         "(threshold 50%)"),
        (None, None),
    ]
    # both turns in one row (30 words, 23 8-grams): the eval item has no 8-gram spanning its
    # two turns, so 12 + 4 match
    [(reason, detail)] = verdicts(rows([f"{first_turn} {second_turn}"]), index)
    assert reason == "contaminated"
    assert detail.startswith("70% (16 of 23)")


def test_text_shorter_than_n_is_one_ngram(index):
    # MT-Bench question 121's second turn has 4 words
    assert verdicts(rows(["can you PARALLELIZE it?", "Can you parallelize it now?"]), index) == [
        ("contaminated", "the row's whole text (4 words, fewer than ngram 8) matches "
                         "mt_bench item 121"),
        (None, None),
    ]


# ------------------------------------------------------------------ the rule, exactly


def reference_best(row: str, items: list[list[str]], n: int) -> tuple[int, int, int]:
    """The rule in plain Python: (shared, row n-grams, item) for the best single eval item."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[^\W_]+|_+", unicodedata.normalize("NFKC", text).lower())
        if len(words) < n:
            return {tuple(words)} if words else set()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    mine = grams(row)
    scores = [(len(mine & set().union(*map(grams, texts))), -number)
              for number, texts in enumerate(items)]
    shared, item = max(scores)
    return shared, len(mine), -item


def test_vectorized_scores_equal_a_plain_python_reference(index):
    seeds = pq.read_table(SEEDS)["instruction"].to_pylist()[:40]
    samples = [KYLAR, KYLAR_PARAPHRASE, GSM8K_QUESTIONS[17][:150], *seeds,
               " ".join(GSM8K_QUESTIONS[3].split()[5:30]), MT_BENCH_81["turns"][0]]
    items = [[q] for q in GSM8K_QUESTIONS] + [
        row["turns"] for row in eval_rows(EVAL / "mt_bench_questions.jsonl")]
    matches = best_matches(index, fold(pa.array(samples), NormalizeSpec()))
    for k, text in enumerate(samples):
        shared, total, item = reference_best(text, items, 8)
        assert (matches.shared[k], matches.grams[k]) == (shared, total), text
        if shared:
            assert matches.item[k] == item, text



def small_index(tmp_path: Path, texts: list[str], n: int) -> NgramIndex:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"question": t}) + "\n" for t in texts))
    built, _ = build_index([EvalSetSpec(uri=str(path))], n=n, step="d")
    return built


def test_threshold_is_inclusive(tmp_path):
    index = small_index(tmp_path, ["w1 w2 w3 w4 w5"], n=2)
    table = rows(["w1 w2 w3 x y"])  # 2-grams w1w2 and w2w3 of 4 match: 50%
    assert verdicts(table, index, threshold=0.5) == [
        ("contaminated", "50% (2 of 4) of the row's 2-grams match eval item 0 (threshold 50%)"),
    ]
    assert verdicts(table, index, threshold=0.51) == [(None, None)]


def test_share_counts_one_eval_item_not_the_union(tmp_path):
    index = small_index(tmp_path, ["a b c d", "e f g h"], n=2)
    # 6 of 7 2-grams are in some eval item, but at most 3 are in one
    assert verdicts(rows(["a b c d e f g h"]), index) == [(None, None)]
    assert verdicts(rows(["a b c d e f g h"]), index, threshold=0.4) == [
        ("contaminated", "43% (3 of 7) of the row's 2-grams match eval item 0 (threshold 40%)"),
    ]


def test_the_item_sharing_the_most_ngrams_is_named(tmp_path):
    index = small_index(tmp_path, ["d e", "a b c d", "a b"], n=2)
    # 2-grams ab, bc, cd (item 1: 3), de (item 0: 1), ab (item 2: 1)
    assert verdicts(rows(["a b c d e"]), index) == [
        ("contaminated", "75% (3 of 4) of the row's 2-grams match eval item 1 (threshold 50%)"),
    ]


def test_repeated_ngrams_count_once(tmp_path):
    index = small_index(tmp_path, ["x y x y x y"], n=2)
    # distinct 2-grams of the row: (x y), (y x), (y z): 2 of 3 match
    assert verdicts(rows(["x y x y x y z"]), index, threshold=0.6)[0][1].startswith(
        "67% (2 of 3)")


def test_rows_rejected_earlier_and_empty_rows_are_left_alone(index):
    table = rows([KYLAR, KYLAR, "", None])
    table = table.set_column(table.schema.get_field_index("reject_step"), "reject_step",
                             pa.array(["filter", None, None, None]))
    out = decontaminate_table(table, index, ["instruction"], 0.5, "decontaminate").to_pylist()
    assert [r["reject_step"] for r in out] == ["filter", "decontaminate", None, None]
    assert out[0]["reject_detail"] is None


def test_missing_or_non_text_row_column_is_a_clear_error(index):
    with pytest.raises(InputDataError, match="'decontaminate' needs column 'question'"):
        decontaminate_table(rows(["x"]), index, ["question"], 0.5, "decontaminate")
    with pytest.raises(InputDataError, match="'score', which holds int64, not text"):
        decontaminate_table(rows(["x"], score=[1]), index, ["score"], 0.5, "decontaminate")


def test_hashes_do_not_depend_on_python_hash_salt(tmp_path):
    import hashlib

    digest = hashlib.blake2b(b"duck", digest_size=8).digest()
    assert hash64(["duck"])[0] == int.from_bytes(digest, "little")
    script = ("import numpy as np, pyarrow as pa\n"
              "from augment_ray.curate.decontaminate import text_ngrams\n"
              f"g, _ = text_ngrams(pa.array([{KYLAR!r}]), 8)\n"
              "print(int(np.bitwise_xor.reduce(g)))")
    prints = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(prints) == 1


# ------------------------------------------------------------------ loading eval sets


def test_folder_of_parquet_files_numbers_items_in_file_order(tmp_path):
    folder = tmp_path / "gsm"
    folder.mkdir()
    pq.write_table(pa.table({"question": GSM8K_QUESTIONS[:3]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"question": GSM8K_QUESTIONS[3:6]}), folder / "part-1.parquet")
    index, stats = build_index([EvalSetSpec(uri=str(folder))], n=8, step="d")
    assert (stats[0].name, stats[0].items) == ("gsm", 6)
    assert verdicts(rows([KYLAR]), index)[0][1].endswith("match gsm item 5 (threshold 50%)")


def test_eval_set_problems_name_the_step_set_and_column(tmp_path):
    with pytest.raises(InputDataError, match="eval set 'gsm8k_test' has no column 'prompt'"):
        build_index([GSM8K.model_copy(update={"columns": ["prompt"]})], 8, "decontaminate")
    with pytest.raises(InputDataError, match=r"column 'question_id' of eval set 'mt_bench'.*"
                                             r"holds int64, not text or a list of text"):
        build_index([MT_BENCH.model_copy(update={"columns": ["question_id"]})], 8, "d")
    with pytest.raises(StorageError, match=r"cannot load eval set 'nope'.*does not exist"):
        build_index([EvalSetSpec(uri=str(tmp_path / "nope.jsonl"))], 8, "decontaminate")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "ok"}\n{"question": \n')
    with pytest.raises(InputDataError, match=r"cannot load eval set 'broken'.*as jsonl"):
        build_index([EvalSetSpec(uri=str(broken))], 8, "decontaminate")
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"question": null, "answer": "4"}\n')
    with pytest.raises(InputDataError, match=r"eval set 'nulls'.*has no text in columns question"):
        build_index([EvalSetSpec(uri=str(nulls))], 8, "decontaminate")


def test_spec_refuses_two_sets_with_one_name():
    job = {"input": {"uri": "in/"}, "output": {"uri": "out/"}, "steps": [{
        "kind": "decontaminate",
        "eval_sets": [{"uri": "a/gsm8k.jsonl"}, {"uri": "b/gsm8k.parquet"}],
    }]}
    with pytest.raises(JobSpecError, match="eval set name 'gsm8k' is used twice"):
        parse_job(job)


def test_eval_set_read_from_s3(local_s3):
    local_s3.client().put_object(Bucket=local_s3.bucket, Key="evals/mt_bench.jsonl",
                                 Body=(EVAL / "mt_bench_questions.jsonl").read_bytes())
    storage = StorageOptions(endpoint=local_s3.endpoint, region="us-east-1", addressing="path",
                             access_key_id_env=local_s3.key_id_env,
                             secret_access_key_env=local_s3.secret_env)
    remote = MT_BENCH.model_copy(update={"uri": f"s3://{local_s3.bucket}/evals/mt_bench.jsonl",
                                         "storage": storage})
    index, stats = build_index([remote], n=8, step="d")
    assert stats[0].items == 80
    assert verdicts(rows([MT_BENCH_81["turns"][0]]), index)[0][0] == "contaminated"


# ------------------------------------------------------------------ a whole job on Ray


def test_filter_then_decontaminate_job_accounts_for_every_row(local_ray, tmp_path):
    seeds = pq.read_table(SEEDS).slice(0, 4).to_pylist()
    planted = [
        {"id": "copy", "instruction": KYLAR.lower(), "output": "$64"},
        {"id": "paraphrase", "instruction": KYLAR_PARAPHRASE, "output": "$64"},
        {"id": "mt_turn", "instruction": MT_BENCH_81["turns"][0], "output": "Aloha! ..."},
        {"id": "refusal_and_copy", "instruction": GSM8K_QUESTIONS[0],
         "output": "As an AI language model, I cannot count eggs."},
        {"id": "no_answer", "instruction": "Name three primary colors.", "output": None},
        {"id": "no_instruction", "instruction": None, "output": "orphan"},
    ]
    columns = ["id", "instruction", "output"]
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in columns} for r in seeds + planted[:3]]),
                   source / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(planted[3:]), source / "part-1.parquet")
    out = tmp_path / "out"
    job = parse_job({
        "name": "curate",
        "input": {"uri": str(source)},
        "output": {"uri": str(out)},
        "steps": [
            {"kind": "filter"},
            {"kind": "decontaminate", "eval_sets": [GSM8K.model_dump(), MT_BENCH.model_dump()]},
        ],
    })

    summary = run_job(job)

    kept = pq.read_table(out / "data").to_pylist()
    rejected = pq.read_table(out / "_rejects").to_pylist()
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in seeds)
    assert {r["id"]: (r["reject_step"], r["reject_reason"]) for r in rejected} == {
        "copy": ("decontaminate", "contaminated"),
        "paraphrase": ("decontaminate", "contaminated"),
        "mt_turn": ("decontaminate", "contaminated"),
        "refusal_and_copy": ("filter", "refusal"),  # the first step to reject a row owns it
        "no_answer": ("filter", "empty_response"),
        "no_instruction": ("input", "missing_instruction"),
    }
    details = {r["id"]: r["reject_detail"] for r in rejected}
    assert details["copy"].endswith("match gsm8k_test item 5 (threshold 50%)")
    assert details["mt_turn"].endswith("match mt_bench item 81 (threshold 50%)")

    assert summary["rows_in"] == 10
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"]
    assert (summary["rows_out"], summary["rows_rejected"]) == (4, 6)
    assert summary["rejected_by_reason"] == {
        "decontaminate:contaminated": 3, "filter:empty_response": 1, "filter:refusal": 1,
        "input:missing_instruction": 1,
    }
    decontaminate = summary["steps"][2]
    assert (decontaminate["rows_in"], decontaminate["rows_out"]) == (7, 4)
    assert [(s["name"], s["items"]) for s in decontaminate["eval_sets"]] == [
        ("gsm8k_test", 200), ("mt_bench", 80)]


def test_step_ships_the_index_to_ray_tasks_by_reference(local_ray):
    step = DecontaminateStep(DecontaminateStepSpec(kind="decontaminate", eval_sets=[GSM8K]))
    step.prepare()
    ds = step.apply(ray.data.from_arrow(rows([KYLAR, SEED_INSTRUCTION])))
    assert isinstance(step.index_ref, ray.ObjectRef)  # put once, not pickled into each task
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["reject_reason"] for r in out] == ["contaminated", None]
    assert step.describe()["eval_sets"] == [
        {"name": "gsm8k_test", "uri": GSM8K.uri, "items": 200, "ngrams": step.stats[0].ngrams}]
