"""`augment-ray export`: a fake committed output (two shards, null input, a null output, Chinese
text, a refined_instruction column) exported in every JSONL format through the real CLI, each
line's schema checked exactly, and every file read back with Hugging Face `datasets` as the
fine-tuning frameworks read it. Conversations and `--format hf`: test_export_conversations.py.
No Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from augment_ray.cli import main
from augment_ray.export import FORMATS

HELLO = "你好\uff0c世界"  # fullwidth comma, written escaped for ruff
AUTUMN = "秋风起\uff0c落叶黄。"
SHARDS = {
    "data/part-00000-0000.parquet": [
        {"id": "a1", "instruction": "Name a prime.", "input": None, "output": "7",
         "refined_instruction": "Name one prime number below ten."},
        {"id": "a2", "instruction": "Translate to English.", "input": HELLO,
         "output": "Hello, world", "refined_instruction": "Translate the text to English."},
        {"id": "a3", "instruction": "Summarize.", "input": "Long text.", "output": None,
         "refined_instruction": "Summarize the text in one line."},
    ],
    "data/part-00001-0000.parquet": [
        {"id": "b1", "instruction": "写一首关于秋天的诗。", "input": None, "output": AUTUMN,
         "refined_instruction": "写一首四行的关于秋天的诗。"},
        {"id": "b2", "instruction": "Add the numbers.", "input": "2 3", "output": "5",
         "refined_instruction": "Add the two numbers below."},
        {"id": "b3", "instruction": "Say nothing.", "input": "", "output": "",
         "refined_instruction": "Reply with nothing."},
    ],
}
ROWS = [row for rows in SHARDS.values() for row in rows]
EXPORTED = [row for row in ROWS if row["output"]]  # a3 (null) and b3 ("") have no response
SCHEMA = pa.schema([(name, pa.string()) for name in ROWS[0]])
SYSTEM = "You are a helpful assistant. 请用中文或英文回答。"
JSONL_FORMATS = [name for name, fmt in FORMATS.items() if not fmt.folder]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    (root / "data").mkdir(parents=True)
    (root / "_rejects").mkdir()
    for name, rows in SHARDS.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / name)
    # a rejected row must never be exported
    pq.write_table(
        pa.Table.from_pylist([{**ROWS[0], "id": "r1", "output": "REJECTED"}], schema=SCHEMA),
        root / "_rejects/part-00000-0000.parquet",
    )
    (root / "_manifest.json").write_text(json.dumps(
        {"run_id": "test-run", "files": list(SHARDS), "rows": len(ROWS),
         "reject_files": ["_rejects/part-00000-0000.parquet"], "rows_rejected": 1}
    ))
    (root / "_SUCCESS").write_text(json.dumps({"run_id": "test-run"}))
    return root


def export(*args: str):
    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def read_lines(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def prompt(row: dict, column: str = "instruction") -> str:
    return f"{row[column]}\n\n{row['input']}" if row["input"] else row[column]


def expected(fmt: str, row: dict, system: str | None, column: str = "instruction") -> dict:
    """The exact record for `row`, written out independently of augment_ray.export."""
    if fmt == "alpaca":
        record = {"instruction": row[column], "input": row["input"] or "", "output": row["output"]}
        return record if system is None else {**record, "system": system}
    if fmt == "sharegpt":
        head = [] if system is None else [{"from": "system", "value": system}]
        return {"conversations": [*head, {"from": "human", "value": prompt(row, column)},
                                  {"from": "gpt", "value": row["output"]}]}
    if fmt == "llama-factory":
        return {"conversations": [{"from": "human", "value": prompt(row, column)},
                                  {"from": "gpt", "value": row["output"]}],
                "system": system or ""}
    head = [] if system is None else [{"role": "system", "content": system}]
    return {"messages": [*head, {"role": "user", "content": prompt(row, column)},
                         {"role": "assistant", "content": row["output"]}]}


def check_schema(fmt: str, record: dict, system: bool) -> None:
    if fmt == "alpaca":
        keys = ["instruction", "input", "output", *(["system"] if system else [])]
        assert list(record) == keys
        assert all(isinstance(record[key], str) for key in keys)
        assert record["instruction"] and record["output"]
        return
    if fmt == "llama-factory":
        assert list(record) == ["conversations", "system"]
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        assert isinstance(record["system"], str) and bool(record["system"]) == system
        return
    key, tag, text, tags = (
        ("conversations", "from", "value", ["system", "human", "gpt"]) if fmt == "sharegpt"
        else ("messages", "role", "content", ["system", "user", "assistant"])
    )
    assert list(record) == [key]
    turns = record[key]
    assert isinstance(turns, list)
    assert [turn[tag] for turn in turns] == (tags if system else tags[1:])
    for turn in turns:
        assert list(turn) == [tag, text]
        assert isinstance(turn[text], str) and turn[text]


def check_openai_rules(record: dict) -> None:
    """What the OpenAI fine-tuning API's format check requires of a chat example."""
    roles = [message["role"] for message in record["messages"]]
    assert set(roles) <= {"system", "user", "assistant"}
    assert roles.count("user") >= 1 and roles.count("assistant") >= 1
    assert roles[-1] == "assistant"
    assert all(isinstance(message["content"], str) for message in record["messages"])


def load_with_datasets(path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(cache))


@pytest.mark.parametrize("with_system", [False, True], ids=["plain", "system"])
@pytest.mark.parametrize("fmt", JSONL_FORMATS)
def test_export_formats(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        fmt: str, with_system: bool) -> None:
    out = tmp_path / "exports" / f"{fmt}.jsonl"  # parent folder does not exist yet
    system = SYSTEM if with_system else None
    result = export(str(run_dir), "--format", fmt, "--to", str(out),
                    *(["--system", SYSTEM] if with_system else []))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"wrote {len(EXPORTED)} examples to {out} (format {fmt}); "
        "skipped 2 rows without a response"
    )
    assert HELLO in out.read_text(encoding="utf-8")  # ensure_ascii=False
    records = read_lines(out)
    assert len(records) == len(EXPORTED) == 4
    for record, row in zip(records, EXPORTED, strict=True):
        check_schema(fmt, record, with_system)
        assert record == expected(fmt, row, system)
        if fmt == "openai-messages":
            check_openai_rules(record)
    assert "REJECTED" not in out.read_text(encoding="utf-8")

    dataset = load_with_datasets(out, tmp_path / "hf-cache", monkeypatch)
    assert dataset.num_rows == len(EXPORTED)
    columns = {"alpaca": ["instruction", "input", "output", *(["system"] if with_system else [])],
               "sharegpt": ["conversations"], "llama-factory": ["conversations", "system"],
               "openai-messages": ["messages"]}[fmt]
    assert dataset.column_names == columns
    assert dataset[1] == records[1]  # the Chinese example survives the round trip


def test_instruction_column_exports_refined_text(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "refined.jsonl"
    result = export(str(run_dir), "--format", "openai-messages", "--to", str(out),
                    "--instruction-column", "refined_instruction")
    assert result.exit_code == 0, result.output
    records = read_lines(out)
    assert records == [expected("openai-messages", row, None, "refined_instruction")
                       for row in EXPORTED]
    assert records[0]["messages"][0]["content"] == "Name one prime number below ten."


def test_unknown_instruction_column_names_the_columns(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    result = export(str(run_dir), "--format", "alpaca", "--to", str(out),
                    "--instruction-column", "rewritten")
    assert result.exit_code == 1
    assert "no column 'rewritten'" in result.output and "refined_instruction" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.glob(".x.jsonl*")) == []  # no partial file left


def test_missing_input_and_output_columns(tmp_path: Path) -> None:
    """Instruction-only data: the optional columns may be absent; nothing has a response."""
    root = tmp_path / "run"
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"], "instruction": ["Hi"]}), root / "data/p.parquet")
    (root / "_manifest.json").write_text(json.dumps({"files": ["data/p.parquet"], "rows": 1}))
    (root / "_SUCCESS").write_text("{}")
    out = tmp_path / "out.jsonl"
    result = export(str(root), "--format", "alpaca", "--to", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 0 examples" in result.output and "skipped 1 rows" in result.output
    assert out.read_text() == ""


def test_unfinished_run_is_refused(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "_SUCCESS").unlink()
    out = tmp_path / "x.jsonl"
    result = export(str(run_dir), "--format", "alpaca", "--to", str(out))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "not a finished run" in lines[0] and str(run_dir) in lines[0]
    assert not out.exists()


def test_existing_file_needs_force(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    out.write_text("keep me\n")
    result = export(str(run_dir), "--format", "sharegpt", "--to", str(out))
    assert result.exit_code != 0
    assert "already exists" in result.output and "--force" in result.output
    assert out.read_text() == "keep me\n"

    result = export(str(run_dir), "--format", "sharegpt", "--to", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert len(read_lines(out)) == len(EXPORTED)


def test_cli_choices_match_formats() -> None:
    command = main.commands["export"]
    option = next(param for param in command.params if param.name == "fmt")
    assert isinstance(option.type, click.Choice)
    assert list(option.type.choices) == list(FORMATS)


def test_docs_list_every_format() -> None:
    """docs/OUTPUT.md's format table names exactly the registry's formats, in its order."""
    text = (Path(__file__).parents[1] / "docs/OUTPUT.md").read_text(encoding="utf-8")
    section = text.split("## Exporting for fine-tuning frameworks", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert rows == ["--format", *FORMATS]  # the header, then one row per format
