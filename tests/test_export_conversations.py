"""`augment-ray export` of a run mixing conversations (a `messages` column) and single-turn rows,
in every format including `--format hf`, through the real CLI; every file read back with Hugging
Face `datasets` (load_dataset("json") / load_from_disk) as the trainers read it. No Ray, no
model."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from augment_ray.cli import main
from augment_ray.export import FORMATS

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SYS = "You are a terse tutor."
FALLBACK = "Answer briefly."  # --system, for examples without their own system turn


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# shard 0 has a messages column; shard 1 (single-turn rows only) has none
CONVERSATIONS = [
    {"id": "c1", "instruction": "What is 2+2?", "input": None, "output": "Yes: 12.",
     "refined_instruction": "Compute 2+2.",
     "messages": [turn("system", SYS), turn("user", "What is 2+2?"), turn("assistant", "4."),
                  turn("user", "And times 3?"), turn("assistant", "Yes: 12.")]},
    # auto_correct rewrote `output`: the corrected answer is what gets exported
    {"id": "c2", "instruction": "Capital of France?", "input": None, "output": "Paris.",
     "refined_instruction": "Name the capital of France.",
     "messages": [turn("user", "Capital of France?"), turn("assistant", "Lyon.")]},
    # unanswered: the last turn is a user turn
    {"id": "c3", "instruction": "Hi", "input": None, "output": "Hello!",
     "refined_instruction": "Say hi.",
     "messages": [turn("user", "Hi"), turn("assistant", "Hello!"), turn("user", "Bye?")]},
    # user turns only (questions awaiting answers)
    {"id": "c4", "instruction": "Q1", "input": None, "output": None,
     "refined_instruction": "Q1 refined",
     "messages": [turn("user", "Q1"), turn("user", "Q2")]},
    {"id": "s1", "instruction": "Name a prime.", "input": None, "output": "7",
     "refined_instruction": "Name one prime below ten.", "messages": None},
]
SINGLE = [
    {"id": "s2", "instruction": "Add the numbers.", "input": "2 3", "output": "5",
     "refined_instruction": "Add the two numbers."},
    {"id": "s3", "instruction": "Summarize.", "input": "Long text.", "output": None,
     "refined_instruction": "Summarize in one line."},
]
SKIPPED = 3  # c3, c4 (unanswered), s3 (null output)

# what each exported example is, as turns (system first when it has one), written out by hand
EXPECTED_TURNS = {
    "c1": [turn("system", SYS), turn("user", "What is 2+2?"), turn("assistant", "4."),
           turn("user", "And times 3?"), turn("assistant", "Yes: 12.")],
    "c2": [turn("user", "Capital of France?"), turn("assistant", "Paris.")],
    "s1": [turn("user", "Name a prime."), turn("assistant", "7")],
    "s2": [turn("user", "Add the numbers.\n\n2 3"), turn("assistant", "5")],
}
EXPORTED = list(EXPECTED_TURNS)


def with_fallback(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return turns if turns[0]["role"] == "system" else [turn("system", FALLBACK), *turns]


def commit_run(root: Path, shards: dict[str, pa.Table]) -> Path:
    """A committed run output as a run leaves it: data/ shards, manifest, _SUCCESS."""
    (root / "data").mkdir(parents=True)
    for name, table in shards.items():
        pq.write_table(table, root / name)
    (root / "_manifest.json").write_text(json.dumps(
        {"run_id": "test-run", "files": list(shards),
         "rows": sum(table.num_rows for table in shards.values())}))
    (root / "_SUCCESS").write_text(json.dumps({"run_id": "test-run"}))
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    text = [(name, pa.string()) for name in ("id", "instruction", "input", "output",
                                             "refined_instruction")]
    return commit_run(tmp_path / "run", {
        "data/part-00000-0000.parquet": pa.Table.from_pylist(
            CONVERSATIONS, schema=pa.schema([*text, ("messages", MESSAGES)])),
        "data/part-00001-0000.parquet": pa.Table.from_pylist(SINGLE, schema=pa.schema(text)),
    })


def export(*args: str):
    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def run_export(run: Path, fmt: str, to: Path, *args: str, written: int = len(EXPORTED),
               skipped: int = SKIPPED) -> None:
    result = export(str(run), "--format", fmt, "--to", str(to), *args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.output.strip() == (f"wrote {written} examples to {to} (format {fmt}); "
                                     f"skipped {skipped} rows without a response")


def load_json(path: Path, cache: Path, **options) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(cache), **options)


def as_turns(fmt: str, record: dict) -> list[dict[str, str]]:
    """A record of `fmt` back to canonical turns, checking the format's own rules on the way."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    if fmt in ("openai-messages", "hf"):
        assert list(record) == ["messages"]
        turns = [dict(message) for message in record["messages"]]
    elif fmt == "sharegpt":
        assert list(record) == ["conversations"]
        turns = [turn(roles[item["from"]], item["value"]) for item in record["conversations"]]
    elif fmt == "llama-factory":
        assert list(record) == ["conversations", "system"]
        tags = [item["from"] for item in record["conversations"]]
        assert tags == ["human", "gpt"] * (len(tags) // 2)  # alternating, from human, no system
        head = [turn("system", record["system"])] if record["system"] else []
        turns = head + [turn(roles[item["from"]], item["value"])
                        for item in record["conversations"]]
    else:  # alpaca: the last exchange, earlier ones in history
        assert list(record) == ["instruction", "input", "output", "system", "history"]
        head = [turn("system", record["system"])] if record["system"] else []
        history = [turn(role, text) for pair in record["history"]
                   for role, text in zip(("user", "assistant"), pair, strict=True)]
        user = (f"{record['instruction']}\n\n{record['input']}" if record["input"]
                else record["instruction"])
        turns = head + history + [turn("user", user), turn("assistant", record["output"])]
    body = [t["role"] for t in turns if t["role"] != "system"]
    assert body == ["user", "assistant"] * (len(body) // 2) and body  # ends with an answer
    assert all(t["role"] != "system" for t in turns[1:])
    return turns


def read_back(fmt: str, to: Path, cache: Path) -> list[dict]:
    if fmt == "hf":
        return list(datasets.load_from_disk(str(to)))
    return list(load_json(to, cache))


@pytest.mark.parametrize("fallback", [False, True], ids=["own-system", "fallback-system"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_conversations_export(run_dir: Path, tmp_path: Path, fmt: str, fallback: bool) -> None:
    to = tmp_path / "exports" / (fmt if fmt == "hf" else f"{fmt}.jsonl")
    run_export(run_dir, fmt, to, *(["--system", FALLBACK] if fallback else []))
    records = read_back(fmt, to, tmp_path / "hf-cache")
    assert len(records) == len(EXPORTED)
    got = [as_turns(fmt, record) for record in records]
    want = [EXPECTED_TURNS[key] for key in EXPORTED]
    assert got == ([with_fallback(turns) for turns in want] if fallback else want)
    if fmt == "alpaca":  # LLaMA-Factory's alpaca with history, written out
        assert records[0] == {"instruction": "And times 3?", "input": "", "output": "Yes: 12.",
                              "system": SYS, "history": [["What is 2+2?", "4."]]}
        assert records[3] == {"instruction": "Add the numbers.", "input": "2 3", "output": "5",
                              "system": FALLBACK if fallback else "", "history": []}
    if fmt == "llama-factory":
        assert records[0]["system"] == SYS
        assert records[1]["system"] == (FALLBACK if fallback else "")
    text = "".join(json.dumps(record) for record in records)
    assert "Lyon." not in text and "Bye?" not in text and "Q2" not in text


@pytest.mark.parametrize("fmt", ["openai-messages", "alpaca", "hf"])
def test_instruction_column_rewrites_the_first_user_turn(run_dir: Path, tmp_path: Path,
                                                         fmt: str) -> None:
    to = tmp_path / (fmt if fmt == "hf" else f"{fmt}.jsonl")
    run_export(run_dir, fmt, to, "--instruction-column", "refined_instruction")
    got = [as_turns(fmt, record) for record in read_back(fmt, to, tmp_path / "cache")]
    users = [[t["content"] for t in turns if t["role"] == "user"] for turns in got]
    # the first user turn of a conversation; a single-turn row's instruction (input after it)
    assert users == [["Compute 2+2.", "And times 3?"], ["Name the capital of France."],
                     ["Name one prime below ten."], ["Add the two numbers.\n\n2 3"]]
    assert got[1][-1] == turn("assistant", "Paris.")  # output still applied


def test_alpaca_line_with_history_comes_first(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` types a JSON file's columns from its first block: when the first example with
    history comes after only empty ones, it is moved to the front, so the file loads."""
    monkeypatch.setattr("augment_ray.export_writers.FRONT_BYTES", 1000)
    rows = [{"instruction": f"Question {i}?", "output": "An answer. " * 5, "messages": None}
            for i in range(100)]
    rows.append({"instruction": "Hi", "output": "Fine.", "messages": [
        turn("user", "Hi"), turn("assistant", "Hello."),
        turn("user", "How are you?"), turn("assistant", "Fine.")]})
    schema = pa.schema([("instruction", pa.string()), ("output", pa.string()),
                        ("messages", MESSAGES)])
    run = commit_run(tmp_path / "run", {"data/p.parquet": pa.Table.from_pylist(rows, schema)})
    to = tmp_path / "a.jsonl"
    run_export(run, "alpaca", to, written=101, skipped=0)
    first = json.loads(to.read_text(encoding="utf-8").splitlines()[0])
    assert first["history"] == [["Hi", "Hello."]]
    dataset = load_json(to, tmp_path / "cache", chunksize=2000)  # many blocks, as a big file
    assert dataset.num_rows == 101 and dataset[0]["history"] == [["Hi", "Hello."]]
    assert [row["instruction"] for row in dataset][1:] == [f"Question {i}?" for i in range(100)]


def test_hf_folder_replaced_only_with_force(run_dir: Path, tmp_path: Path) -> None:
    to = tmp_path / "ds"
    run_export(run_dir, "hf", to)
    result = export(str(run_dir), "--format", "hf", "--to", str(to))
    assert result.exit_code == 1 and "already exists" in result.output
    assert "--force" in result.output and "Traceback" not in result.output
    run_export(run_dir, "hf", to, "--force", "--system", FALLBACK)
    assert datasets.load_from_disk(str(to))[3]["messages"][0] == turn("system", FALLBACK)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ds", "run"]  # no staging left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = export(str(run_dir), "--format", "hf", "--to", str(other), "--force")
    assert result.exit_code == 1 and "holds no saved dataset" in result.output
    assert (other / "keep.txt").read_text() == "mine"


def test_hf_failed_export_leaves_nothing(run_dir: Path, tmp_path: Path) -> None:
    """A shard fails mid-export (a column missing from the second shard only)."""
    to = tmp_path / "ds"
    table = pq.read_table(run_dir / "data/part-00001-0000.parquet")
    pq.write_table(table.drop_columns(["refined_instruction"]),
                   run_dir / "data/part-00001-0000.parquet")
    result = export(str(run_dir), "--format", "hf", "--to", str(to),
                    "--instruction-column", "refined_instruction")
    assert result.exit_code == 1, result.output
    assert "no column 'refined_instruction'" in result.output
    assert "Traceback" not in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_hf_export_with_no_examples(tmp_path: Path) -> None:
    run = commit_run(tmp_path / "run", {"data/p.parquet": pa.table(
        {"instruction": ["Hi"], "output": [None],
         "messages": pa.array([[turn("user", "Hi")]], MESSAGES)})})
    to = tmp_path / "ds"
    run_export(run, "hf", to, written=0, skipped=1)
    dataset = datasets.load_from_disk(str(to))
    assert dataset.num_rows == 0 and dataset.column_names == ["messages"]


def test_out_of_order_conversation_is_counted(tmp_path: Path) -> None:
    """Not expected in data/ (the reader rejects it), but never exported as a broken chat."""
    run = commit_run(tmp_path / "run", {"data/p.parquet": pa.table(
        {"instruction": ["Hi", "Q"], "output": ["Yo", "A"],
         "messages": pa.array([[turn("user", "Hi"), turn("user", "Hey"), turn("assistant", "Yo")],
                               [turn("user", "Q"), turn("assistant", "A")]], MESSAGES)})})
    to = tmp_path / "out.jsonl"
    result = export(str(run), "--format", "llama-factory", "--to", str(to))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"wrote 1 examples to {to} (format llama-factory); skipped 0 rows without a response and "
        "1 conversations whose turns are out of order or empty")
