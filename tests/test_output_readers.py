"""A committed output, read the way downstream fine-tuning jobs read it: Ray Data, pyarrow,
pandas, DuckDB and Hugging Face datasets all see data/ as one table with the manifest's rows, ids
and columns. Also the layout itself: deterministic shard names, rows_per_file, the commit marker
and the provenance fields of _manifest.json."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.config.job import JobSpec, parse_job
from augment_ray.pipeline import run_job, spec_digest

pytestmark = pytest.mark.integration

N_ROWS = 50
DUPLICATES = range(40, 45)  # rows 40..44 repeat rows 0..4: dedup keeps the lowest id
NULL_ROW = N_ROWS - 1  # a null instruction: rejected as missing_instruction
SHARD_NAME = re.compile(r"part-\d{5}-\d{4}\.parquet")


@dataclass(frozen=True)
class Output:
    root: Path
    manifest: dict
    job: JobSpec

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def columns(self) -> list[str]:
        return [field["name"] for field in self.manifest["schema"]]

    @property
    def ids(self) -> set[str]:
        return set(
            pa.concat_tables(
                [pq.read_table(self.root / name, columns=["id"]) for name in self.manifest["files"]]
            )["id"].to_pylist()
        )


def input_rows() -> list[dict]:
    rows = [
        {"id": f"r{k:03d}", "instruction": f"Write a haiku about topic {k}.", "output": f"h{k}"}
        for k in range(N_ROWS)
    ]
    for k in DUPLICATES:
        source = rows[k - 40]
        rows[k] = {**rows[k], "instruction": source["instruction"], "output": source["output"]}
    rows[NULL_ROW]["instruction"] = None
    return rows


def make_job(source: Path, output: Path) -> JobSpec:
    return parse_job({
        "name": "readers",
        "input": {"uri": str(source)},
        "output": {"uri": str(output), "max_rows_per_file": 10},
        "steps": [{"kind": "dedup_exact"}],
    })


def run(job: JobSpec, root: Path) -> Output:
    run_job(job)
    return Output(root, json.loads((root / "_manifest.json").read_text()), job)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    rows = input_rows()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), folder / "part-1.parquet")
    return folder


@pytest.fixture(scope="module")
def output(local_ray, source, tmp_path_factory) -> Output:
    root = tmp_path_factory.mktemp("out")
    return run(make_job(source, root), root)


def expected_ids() -> set[str]:
    dropped = {f"r{k:03d}" for k in [*DUPLICATES, NULL_ROW]}
    return {f"r{k:03d}" for k in range(N_ROWS)} - dropped


def test_the_output_holds_what_the_job_kept(output):
    assert output.manifest["rows"] == len(expected_ids())
    assert output.manifest["rows_rejected"] == len(DUPLICATES) + 1
    assert output.ids == expected_ids()
    assert {"id", "instruction", "output"} <= set(output.columns)


def test_ray_data_reads_it(output):
    import ray.data

    ds = ray.data.read_parquet(str(output.data))
    assert ds.count() == output.manifest["rows"]
    assert {row["id"] for row in ds.select_columns(["id"]).take_all()} == output.ids
    assert ds.schema().names == output.columns


def test_pyarrow_reads_it(output):
    import pyarrow.dataset as pads

    dataset = pads.dataset(output.data, format="parquet")
    assert dataset.count_rows() == output.manifest["rows"]
    assert dataset.schema.names == output.columns
    table = pq.read_table(output.data)
    assert table.num_rows == output.manifest["rows"]
    assert set(table["id"].to_pylist()) == output.ids
    assert table.column_names == output.columns


def test_pandas_reads_it(output):
    import pandas as pd

    frame = pd.read_parquet(output.data)
    assert len(frame) == output.manifest["rows"]
    assert set(frame["id"]) == output.ids
    assert list(frame.columns) == output.columns


def test_duckdb_reads_it(output):
    import duckdb

    files = f"read_parquet('{output.data}/*.parquet')"
    with duckdb.connect(config={"threads": 1}) as con:
        [(count, distinct)] = con.sql(
            f"SELECT count(*), count(DISTINCT id) FROM {files}"
        ).fetchall()
        ids = {row[0] for row in con.sql(f"SELECT id FROM {files}").fetchall()}
        columns = con.sql(f"SELECT * FROM {files} LIMIT 0").columns
    assert count == distinct == output.manifest["rows"]
    assert ids == output.ids
    assert columns == output.columns


def test_hugging_face_datasets_reads_it(output, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    # in case another test imported them before the variables were set
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    ds = datasets.load_dataset(
        "parquet", data_files=f"{output.data}/*.parquet", split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds.num_rows == output.manifest["rows"]
    assert set(ds["id"]) == output.ids
    assert ds.column_names == output.columns


def test_rows_per_file_matches_every_file(output):
    manifest = output.manifest
    per_file = manifest["rows_per_file"]
    assert set(per_file) == set(manifest["files"]) | set(manifest["reject_files"])
    assert sum(per_file[name] for name in manifest["files"]) == manifest["rows"]
    assert sum(per_file[name] for name in manifest["reject_files"]) == manifest["rows_rejected"]
    for name, rows in per_file.items():
        assert pq.ParquetFile(output.root / name).metadata.num_rows == rows, name
    assert max(per_file.values()) <= 10  # max_rows_per_file split the write tasks' rows
    # every file on disk is in the manifest, and nothing else is
    on_disk = {str(p.relative_to(output.root)) for p in output.root.glob("*/*.parquet")}
    assert on_disk == set(per_file)


def test_shard_names_are_deterministic(output, source, tmp_path):
    manifest = output.manifest
    names = manifest["files"] + manifest["reject_files"]
    assert names and all(name.startswith(("data/", "_rejects/")) for name in names)
    assert all(SHARD_NAME.fullmatch(name.split("/", 1)[1]) for name in names), names
    assert all(manifest["run_id"] not in name for name in names)

    again = run(make_job(source, tmp_path / "again"), tmp_path / "again")
    assert again.manifest["run_id"] != manifest["run_id"]
    assert set(again.manifest["files"]) == set(manifest["files"])
    assert set(again.manifest["reject_files"]) == set(manifest["reject_files"])
    assert again.manifest["rows_per_file"] == manifest["rows_per_file"]
    assert again.manifest["job_spec_sha256"] != manifest["job_spec_sha256"]  # output.uri differs


def test_success_marker_names_the_run(output):
    success = json.loads((output.root / "_SUCCESS").read_text())
    assert success["run_id"] == output.manifest["run_id"]


def test_manifest_provenance(output):
    import importlib.metadata

    import ray

    manifest = output.manifest
    sha = manifest["job_spec_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    assert manifest["job_digest"] == sha[:16] == spec_digest(output.job)
    assert manifest["code_version"] == {
        "augment_ray": importlib.metadata.version("augment-ray"),
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
    }
    assert manifest["format"] == "parquet"
    assert manifest["compression"] == "zstd"
    for name in manifest["files"]:
        column = pq.ParquetFile(output.root / name).metadata.row_group(0).column(0)
        assert column.compression == "ZSTD"
    assert manifest["input"] == str(output.job.input.uri)
    assert manifest["input_files"] == ["part-0.parquet", "part-1.parquet"]
