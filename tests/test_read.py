"""Input shards -> normalized rows: column mapping, ids, per-row rejections, clear errors."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.config.io import InputSpec
from augment_ray.errors import InputDataError, StorageError
from augment_ray.io.read import (
    InputShard,
    ShardNormalizer,
    check_first_shard,
    list_input_shards,
    read_shards,
)
from augment_ray.rows import content_id


def normalize(table: pa.Table, **spec) -> pa.Table:
    return ShardNormalizer(InputSpec(uri="x", **spec)).normalize(table, "f.parquet", Counter())


def test_mapping_renames_and_keeps_other_columns():
    table = pa.table({"q": ["What is 2+2?"], "a": ["4"], "topic": ["math"]})
    out = normalize(table, columns={"instruction": "q", "output": "a"})
    row = out.to_pylist()[0]
    assert row["instruction"] == "What is 2+2?"
    assert row["output"] == "4"
    assert row["input"] is None
    assert row["topic"] == "math"
    assert row["source_id"] == row["id"] == content_id(["What is 2+2?", None, "4"])
    assert row["origin_step"] == "input"
    assert row["reject_step"] is None
    assert "q" not in out.column_names


def test_content_ids_are_stable_and_repeats_distinct():
    table = pa.table({"instruction": ["same", "same", "other"]})
    first = normalize(table)["id"].to_pylist()
    again = normalize(table)["id"].to_pylist()
    assert first == again
    assert len(set(first)) == 3


def test_content_ids_differ_across_shards_for_the_same_rows():
    table = pa.table({"instruction": ["same", "same"]})
    normalizer = ShardNormalizer(InputSpec(uri="x"))
    first = normalizer.normalize(table, "a", Counter(), "part-0.parquet")["id"].to_pylist()
    second = normalizer.normalize(table, "b", Counter(), "part-1.parquet")["id"].to_pylist()
    assert len(set(first + second)) == 4  # global dedup keeps the lowest id: ids must be unique
    again = normalizer.normalize(table, "a", Counter(), "part-0.parquet")["id"].to_pylist()
    assert again == first


def test_given_ids_are_kept_and_null_ids_filled():
    table = pa.table({"instruction": ["a", "b"], "id": [7, None]})
    ids = normalize(table)["id"].to_pylist()
    assert ids[0] == "7"
    assert ids[1] == content_id(["b", None, None])


def test_missing_and_too_long_rows_are_rejected_with_reasons():
    table = pa.table({"instruction": ["ok", None, "   ", "x" * 50]})
    out = normalize(table, max_row_chars=20).to_pylist()
    assert [r["reject_reason"] for r in out] == [
        None, "missing_instruction", "missing_instruction", "too_long",
    ]
    assert out[3]["reject_step"] == "input"
    assert "50 chars" in out[3]["reject_detail"]


def test_missing_mapped_column_is_a_clear_error():
    with pytest.raises(InputDataError, match=r"has no column 'question' .*mapped to instruction"):
        normalize(pa.table({"prompt": ["a"]}), columns={"instruction": "question"})


def test_explicit_output_mapping_must_exist_but_default_may_be_absent():
    normalize(pa.table({"instruction": ["a"]}))  # default input/output: optional
    with pytest.raises(InputDataError, match="'answer'"):
        normalize(pa.table({"instruction": ["a"]}), columns={"output": "answer"})


def test_wrong_type_is_a_clear_error():
    with pytest.raises(InputDataError, match=r"'instruction' in f\.parquet has type int64"):
        normalize(pa.table({"instruction": [1, 2]}))


def test_reserved_column_name_is_refused():
    with pytest.raises(InputDataError, match="'reject_reason', a name the pipeline uses"):
        normalize(pa.table({"instruction": ["a"], "reject_reason": ["x"]}))


def test_listing_skips_markers_and_sorts(tmp_path):
    for name in ["b.parquet", "a.parquet", "_SUCCESS", ".tmp.parquet", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    shards = list_input_shards(InputSpec(uri=str(tmp_path)))
    assert [s.path.rsplit("/", 1)[-1] for s in shards] == ["a.parquet", "b.parquet"]


def test_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_input_shards(InputSpec(uri=str(tmp_path / "nope")))
    with pytest.raises(InputDataError, match="holds no parquet or jsonl files"):
        list_input_shards(InputSpec(uri=str(tmp_path)))


def test_jsonl_and_broken_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "yo"}\n')
    batch = pa.table({"path": [str(good)], "format": ["jsonl"]})
    rows = pa.concat_tables(read_shards(batch, InputSpec(uri=str(tmp_path)))).to_pylist()
    assert [r["instruction"] for r in rows] == ["hi", "yo"]

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "hi"}\n{not json\n')
    with pytest.raises(InputDataError, match=r"Cannot read input file .*broken.jsonl as jsonl"):
        check_first_shard(InputSpec(uri=str(broken)), InputShard(str(broken), "jsonl"))

    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all")
    with pytest.raises(InputDataError, match=r"fake\.parquet as parquet"):
        check_first_shard(InputSpec(uri=str(fake)), InputShard(str(fake), "parquet"))


def test_read_shards_carries_repeat_counts_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("augment_ray.io.read.READ_BATCH_ROWS", 2)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"instruction": ["dup"] * 5}), path)
    batch = pa.table({"path": [str(path)], "format": ["parquet"]})
    tables = list(read_shards(batch, InputSpec(uri=str(path))))
    assert len(tables) == 3
    ids = pa.concat_tables(tables)["id"].to_pylist()
    assert len(set(ids)) == 5


def test_step_output_column_may_not_overwrite_an_input_column(tmp_path):
    from augment_ray.config.job import parse_job
    from augment_ray.errors import JobSpecError
    from augment_ray.kinds import build_steps
    from augment_ray.pipeline import check_column_clashes

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "refined_instruction": ["mine"]}), path)
    job = parse_job({
        "input": {"uri": str(path)}, "output": {"uri": str(tmp_path / "out")},
        "engines": {"e": {}}, "steps": [{"kind": "refine", "engine": "e"}],
    })
    columns = set(check_first_shard(job.input, list_input_shards(job.input)[0]))
    with pytest.raises(JobSpecError, match="writes column 'refined_instruction', which the input"):
        check_column_clashes(build_steps(job), columns)
