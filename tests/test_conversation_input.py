"""Multi-turn conversations and Hugging Face datasets folders as input: real files (JSONL,
Parquet, save_to_disk folders, one of them on the local S3 server) through the reader, and one
real `augment-ray run` of a conversation input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.base import StorageOptions
from augment_ray.config.io import InputSpec
from augment_ray.config.job import parse_job
from augment_ray.conversations import CONVERSATION_TYPE
from augment_ray.errors import InputDataError, JobSpecError
from augment_ray.io.read import check_first_shard, list_input_shards, read_shards
from augment_ray.rows import content_id

CLI = [sys.executable, "-m", "augment_ray.cli"]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "11"},
]
SHAREGPT = [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Name a prime."},
    {"from": "gpt", "value": "7"},
    {"from": "human", "value": "Another?"},
    {"from": "gpt", "value": "11"},
]
# value of `messages` -> (reason, detail fragment naming the turn)
BAD = {
    "no-turns": ([], "empty_conversation", "the conversation has no turns"),
    "system-only": ([{"role": "system", "content": "s"}], "empty_conversation", "no user turn"),
    "a-string": ("hello", "not_a_conversation", "expected a list of turns, got str"),
    "string-turn": (["hello"], "not_a_conversation", "turn 1 is str"),
    "bot": ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
            "unknown_role", "turn 2 has role 'bot'"),
    "blank": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
              "empty_turn", "turn 2 (assistant) has no text"),
    "no-content": ([{"role": "user", "content": "hi"}, {"role": "assistant"}],
                   "empty_turn", "turn 2 (assistant) has no text"),
    "number": ([{"role": "user", "content": 3}], "empty_turn", "turn 1 (user) has no text"),
    "two-users": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}],
                  "not_alternating", "turn 2 is user where assistant was expected"),
    "late-system": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "system", "content": "c"}],
                    "misplaced_system", "turn 3 is a system turn"),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_all(spec: InputSpec) -> pa.Table:
    tables = []
    for shard in list_input_shards(spec):
        batch = pa.table({"path": [shard.path], "format": [shard.format]})
        tables += list(read_shards(batch, spec))
    return pa.concat_tables(tables)


# ---- layouts -----------------------------------------------------------------------------------


def test_messages_jsonl_becomes_messages_and_derived_text_columns(tmp_path):
    chat = [dict(turn) for turn in CHAT]
    chat[2]["weight"] = 0  # extra keys (trainers' per-turn flags) are left out
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat, "topic": "math"}])
    spec = InputSpec(uri=str(path))
    out = read_all(spec)
    assert out.schema.field("messages").type == CONVERSATION_TYPE
    assert out.column_names[:5] == ["id", "instruction", "input", "output", "messages"]
    [row] = out.to_pylist()
    assert row["messages"] == CHAT
    assert (row["instruction"], row["input"], row["output"]) == ("Name a prime.", None, "11")
    assert row["topic"] == "math"
    assert row["reject_step"] is None
    assert "messages" in check_first_shard(spec, list_input_shards(spec)[0])


def test_sharegpt_jsonl_and_parquet_read_alike(tmp_path):
    turns = [{**turn, "loss": index % 2 == 0} for index, turn in enumerate(SHAREGPT)]
    jsonl = write_jsonl(tmp_path / "j" / "sharegpt.jsonl", [{"conversations": turns}])
    parquet = tmp_path / "p" / "sharegpt.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"conversations": turns}]), parquet)
    for path in (jsonl, parquet):
        [row] = read_all(InputSpec(uri=str(path))).to_pylist()
        assert row["messages"] == CHAT
        assert (row["instruction"], row["output"]) == ("Name a prime.", "11")
        assert "conversations" not in row


def test_turns_layout_reads_user_questions_when_named(tmp_path):
    path = tmp_path / "mt_bench.parquet"
    pq.write_table(pa.table({"turns": [["Write a poem.", "Now shorter."]],
                             "category": ["writing"]}), path)
    with pytest.raises(InputDataError, match="has no column 'instruction'"):
        read_all(InputSpec(uri=str(path)))  # off by default: turns is an ordinary column
    [row] = read_all(InputSpec(uri=str(path), columns={"turns": "turns"})).to_pylist()
    assert row["messages"] == [{"role": "user", "content": "Write a poem."},
                               {"role": "user", "content": "Now shorter."}]
    assert (row["instruction"], row["output"]) == ("Write a poem.", None)
    assert row["category"] == "writing"


def test_single_turn_input_is_unchanged(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    out = read_all(InputSpec(uri=str(path)))
    assert "messages" not in out.column_names
    assert out["id"].to_pylist() == [content_id(["Say hi.", None, "hi"], 0, "pairs.jsonl")]


# ---- per-row rejections ------------------------------------------------------------------------


def test_each_bad_conversation_is_rejected_naming_the_turn_and_good_rows_go_on(tmp_path):
    records = [{"messages": CHAT, "key": "good-1"}]
    records += [{"messages": value, "key": key} for key, (value, _, _) in BAD.items()]
    records += [{"messages": CHAT[1:3], "key": "good-2"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)  # mixed types: the json fallback
    out = read_all(InputSpec(uri=str(path)))
    assert out.schema.field("messages").type == CONVERSATION_TYPE
    rows = {row["key"]: row for row in out.to_pylist()}
    assert len(rows) == len(records)
    for key, (_, reason, detail) in BAD.items():
        row = rows[key]
        assert (row["reject_step"], row["reject_reason"]) == ("input", reason), row
        assert detail in row["reject_detail"], row
        assert row["messages"] is None and row["instruction"] is None
    assert rows["good-1"]["messages"] == CHAT and rows["good-1"]["reject_step"] is None
    assert rows["good-2"]["output"] == "7" and rows["good-2"]["reject_step"] is None
    assert len(set(out["id"].to_pylist())) == len(records)


def test_sharegpt_unknown_tag_and_missing_keys_are_rejected_per_row(tmp_path):
    records = [
        {"conversations": SHAREGPT},
        {"conversations": [{"from": "robot", "value": "hi"}]},
        {"conversations": [{"from": "human"}]},
        {"conversations": [{"value": "hi"}]},
    ]
    rows = read_all(InputSpec(uri=str(write_jsonl(tmp_path / "s.jsonl", records)))).to_pylist()
    assert [(r["reject_reason"], r["reject_detail"]) for r in rows] == [
        (None, None),
        ("unknown_role", rows[1]["reject_detail"]),
        ("empty_turn", "turn 1 (user) has no text"),
        ("unknown_role", rows[3]["reject_detail"]),
    ]
    assert rows[1]["reject_detail"].startswith("turn 1 is from 'robot'")
    assert rows[3]["reject_detail"].startswith("turn 1 is from None")


def test_too_long_counts_every_turn(tmp_path):
    long_middle = [CHAT[1], {"role": "assistant", "content": "x" * 100}, CHAT[3], CHAT[4]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": long_middle}, {"messages": CHAT[1:3]}])
    rows = read_all(InputSpec(uri=str(path), max_row_chars=50)).to_pylist()
    assert rows[0]["reject_reason"] == "too_long"
    assert rows[0]["reject_detail"].startswith("123 chars > input.max_row_chars 50")
    assert rows[1]["reject_reason"] is None


def test_content_ids_include_every_turn(tmp_path):
    other_middle = [*CHAT[:3], {"role": "user", "content": "And one more?"}, CHAT[4]]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": other_middle}])
    spec = InputSpec(uri=str(path))
    first = read_all(spec).to_pylist()
    assert [(r["instruction"], r["output"]) for r in first] == [("Name a prime.", "11")] * 2
    assert first[0]["id"] != first[1]["id"]
    assert [r["id"] for r in read_all(spec).to_pylist()] == [r["id"] for r in first]


def test_all_rejected_and_empty_files_keep_the_messages_type(tmp_path):
    bad = write_jsonl(tmp_path / "bad" / "bad.jsonl", [{"messages": []}, {"messages": None}])
    out = read_all(InputSpec(uri=str(bad)))
    assert out.schema.field("messages").type == CONVERSATION_TYPE
    assert out["reject_reason"].to_pylist() == ["empty_conversation"] * 2
    empty = tmp_path / "empty" / "empty.parquet"
    empty.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("conversations", pa.list_(
        pa.struct([("from", pa.string()), ("value", pa.string())])))])), empty)
    out = read_all(InputSpec(uri=str(empty)))
    assert len(out) == 0 and out.schema.field("messages").type == CONVERSATION_TYPE


# ---- column errors -----------------------------------------------------------------------------


def test_a_text_column_beside_a_conversation_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT, "output": "11"}])
    with pytest.raises(InputDataError, match=r"conversation column 'messages' "
                       r"\(input.columns.messages\) and a column 'output' \(mapped to output\)"):
        read_all(InputSpec(uri=str(path)))


def test_two_conversation_columns_are_an_error_naming_them(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT, "conversations": SHAREGPT}])
    with pytest.raises(InputDataError, match=r"2 conversation columns: 'messages' "
                       r"\(input.columns.messages\), 'conversations' "
                       r"\(input.columns.conversations\)"):
        read_all(InputSpec(uri=str(path)))
    spec = InputSpec(uri=str(path), columns={"messages": None})  # read the ShareGPT one
    with pytest.raises(InputDataError, match="'messages', a name the pipeline uses itself"):
        read_all(spec)


def test_one_column_may_not_have_two_layouts(tmp_path):
    data = {"input": {"uri": "x", "columns": {"turns": "conversations"}},
            "output": {"uri": str(tmp_path)}, "steps": [{"kind": "dedup_exact"}]}
    with pytest.raises(JobSpecError, match="both name column 'conversations'"):
        parse_job(data)


# ---- Hugging Face datasets folders -------------------------------------------------------------


def save_dataset(path: Path, records: list[dict], **kwargs) -> None:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path), **kwargs)


def save_dataset_dict(path: Path) -> None:
    import datasets

    datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"messages": CHAT, "n": i} for i in range(3)]),
        test=datasets.Dataset.from_list([{"messages": CHAT[1:3], "n": 9}]),
    ).save_to_disk(str(path))


def test_hf_dataset_folder_is_detected_and_read_shard_by_shard(tmp_path):
    records = [{"conversations": SHAREGPT, "n": i} for i in range(5)]
    records.append({"conversations": [SHAREGPT[1], *SHAREGPT[1:3]], "n": 5})
    save_dataset(tmp_path / "ds", records, num_shards=2)
    for fmt in ("auto", "hf"):
        spec = InputSpec(uri=str(tmp_path / "ds"), format=fmt)
        shards = list_input_shards(spec)
        assert [s.path.rsplit("/", 1)[-1] for s in shards] == [
            "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
        assert {s.format for s in shards} == {"hf"}
        out = read_all(spec)
        assert out["n"].to_pylist() == list(range(6))
        assert out["messages"].to_pylist()[:5] == [CHAT] * 5
        assert out["reject_reason"].to_pylist() == [None] * 5 + ["not_alternating"]
        assert out.schema.metadata is None  # the datasets library's features are not carried


def test_hf_dataset_dict_split_is_picked_and_required(tmp_path):
    save_dataset_dict(tmp_path / "dd")
    uri = str(tmp_path / "dd")
    assert read_all(InputSpec(uri=uri, split="train"))["n"].to_pylist() == [0, 1, 2]
    [row] = read_all(InputSpec(uri=uri, split="test", format="hf")).to_pylist()
    assert (row["n"], row["output"]) == (9, "7")
    with pytest.raises(InputDataError, match=r"DatasetDict with splits train, test; set "
                       r"input\.split"):
        list_input_shards(InputSpec(uri=uri))
    with pytest.raises(InputDataError, match=r"'validation' is not a split .* train, test"):
        list_input_shards(InputSpec(uri=uri, split="validation"))


def test_hf_format_needs_a_datasets_folder_and_split_needs_a_dataset_dict(tmp_path):
    write_jsonl(tmp_path / "plain" / "a.jsonl", [{"instruction": "hi"}])
    with pytest.raises(InputDataError, match="not a Hugging Face datasets folder"):
        list_input_shards(InputSpec(uri=str(tmp_path / "plain"), format="hf"))
    with pytest.raises(InputDataError, match=r"input\.split is set"):
        list_input_shards(InputSpec(uri=str(tmp_path / "plain"), split="train"))
    save_dataset(tmp_path / "one", [{"instruction": "hi"}])
    with pytest.raises(InputDataError, match="single Hugging Face Dataset"):
        list_input_shards(InputSpec(uri=str(tmp_path / "one"), split="train"))
    assert read_all(InputSpec(uri=str(tmp_path / "one")))["instruction"].to_pylist() == ["hi"]


def test_hf_dataset_dict_is_read_from_s3(local_s3, tmp_path):
    save_dataset_dict(tmp_path / "dd")
    client = local_s3.client()
    for file in sorted((tmp_path / "dd").rglob("*")):
        if file.is_file():
            key = f"hf/dd/{file.relative_to(tmp_path / 'dd').as_posix()}"
            client.put_object(Bucket=local_s3.bucket, Key=key, Body=file.read_bytes())
    storage = StorageOptions(endpoint=local_s3.endpoint, region="us-east-1", addressing="path",
                             access_key_id_env=local_s3.key_id_env,
                             secret_access_key_env=local_s3.secret_env)
    uri = f"s3://{local_s3.bucket}/hf/dd"
    with pytest.raises(InputDataError, match="splits train, test"):
        list_input_shards(InputSpec(uri=uri, storage=storage))
    spec = InputSpec(uri=uri, storage=storage, split="train")
    out = read_all(spec)
    assert out["n"].to_pylist() == [0, 1, 2]
    assert out["messages"].to_pylist() == [CHAT] * 3
    assert len(set(out["id"].to_pylist())) == 3


# ---- the CLI -----------------------------------------------------------------------------------


def test_cli_runs_a_conversation_input_through_a_filter(tmp_path):
    records = [{"messages": CHAT, "key": "good"},
               {"messages": [{"role": "user", "content": "Hi?"},
                             {"role": "assistant", "content": "Hello."}], "key": "short"},
               {"messages": BAD["bot"][0], "key": "bot"},
               {"messages": BAD["two-users"][0], "key": "two-users"}]
    source = write_jsonl(tmp_path / "in" / "chats.jsonl", records)
    out = tmp_path / "out"
    job = {"name": "conversations", "input": {"uri": str(source)},
           "output": {"uri": str(out)}, "steps": [{"kind": "filter", "min_chars": 5}]}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    done = subprocess.run([*CLI, "run", str(job_file)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    data = pq.read_table(sorted((out / "data").glob("*.parquet")))
    rejects = pa.concat_tables([pq.read_table(f) for f in sorted(
        (out / "_rejects").glob("*.parquet"))], promote_options="default")
    assert data.schema.field("messages").type == CONVERSATION_TYPE
    assert data.to_pylist()[0]["messages"] == CHAT
    assert data["key"].to_pylist() == ["good"]
    reasons = {row["key"]: (row["reject_step"], row["reject_reason"])
               for row in rejects.to_pylist()}
    assert reasons == {"short": ("filter", "min_chars"), "bot": ("input", "unknown_role"),
                       "two-users": ("input", "not_alternating")}
    assert len(data) + len(rejects) == len(records)
    assert (out / "_SUCCESS").is_file()
