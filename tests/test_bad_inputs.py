"""Bad inputs, one test per case (the corpus is tests/bad_inputs.py). Each pins the exact
behaviour: either a clear one-paragraph error naming the problem and nothing committed, or a
per-row rejection with a reason in `_rejects/` and every good row in `data/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bad_inputs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from bad_inputs import Case

from augment_ray.config.io import InputSpec
from augment_ray.config.job import JobSpec, parse_job
from augment_ray.errors import InputDataError, StorageError
from augment_ray.io.read import InputShard, check_given_ids_unique, list_input_shards
from augment_ray.pipeline import run_job

CLI = [sys.executable, "-m", "augment_ray.cli"]
CHEAP_STEPS = [{"kind": "dedup_exact"}]
TINY_ENGINE = {"replicas": 1, "num_cpus": 1, "threads": 1, "batch_size": 4,
               "sampling": {"max_tokens": 16}}


# ---- helpers -----------------------------------------------------------------------------------


def job_data(case: Case, out: Path, steps: list | None = None, **input_fields) -> dict:
    data_input = {"uri": str(case.uri), **input_fields}
    if case.columns:
        data_input["columns"] = case.columns
    return {"name": "bad-inputs", "input": data_input, "output": {"uri": str(out)},
            "steps": CHEAP_STEPS if steps is None else steps}


def make_job(case: Case, out: Path, steps: list | None = None, **input_fields) -> JobSpec:
    return parse_job(job_data(case, out, steps, **input_fields))


def read_folder(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []


def assert_committed(out: Path, summary: dict, good_ids: list[str],
                     rejects: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """The run is committed, every good row is in data/ (once), and the rejects are exactly
    `rejects` (id -> reason, all by the input step). Returns (kept, rejected) rows."""
    kept, rejected = read_folder(out / "data"), read_folder(out / "_rejects")
    assert (out / "_SUCCESS").is_file()
    assert sorted(row["id"] for row in kept) == sorted(good_ids)
    assert {row["id"]: row["reject_reason"] for row in rejected} == rejects
    assert all(row["reject_step"] == "input" for row in rejected)
    assert summary["rows_in"] == len(good_ids) + len(rejects)
    assert (summary["rows_out"], summary["rows_rejected"]) == (len(good_ids), len(rejects))
    return kept, rejected


def assert_nothing_committed(out: Path) -> None:
    assert not (out / "_SUCCESS").exists()
    assert not (out / "_manifest.json").exists()
    assert not (out / "_summary.json").exists()


def run_cli(tmp_path: Path, data: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    return subprocess.run([*CLI, "run", str(job_file)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "", **(env or {})}, timeout=300)


def assert_cli_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, one `error:` paragraph on stderr holding every fragment, no traceback."""
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-4000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in done.stdout + done.stderr
    return errors[0]


# ---- column problems ---------------------------------------------------------------------------


def test_missing_mapped_column_is_a_clear_error_before_any_work(tmp_path):
    case = bad_inputs.missing_column(tmp_path / "in")
    out = tmp_path / "out"
    done = run_cli(tmp_path, job_data(case, out))
    assert_cli_error(
        done,
        f"Input {case.bad_file} has no column 'prompt' (mapped to instruction by input.columns).",
        "Its columns are: id, question, output.",
    )
    assert not out.exists()  # checked before the output is touched


def test_column_renamed_in_a_later_shard_fails_the_run_naming_that_file(local_ray, tmp_path):
    case = bad_inputs.renamed_column_in_later_shard(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as error:
        run_job(make_job(case, out))
    # the first line; Ray appends its retry advice to errors raised in its tasks (see
    # test_errors_raised_in_ray_tasks_reach_the_user_as_one_clean_paragraph)
    assert str(error.value).splitlines()[0] == (
        f"Input {case.bad_file} has no column 'instruction' (mapped to instruction by "
        "input.columns). Its columns are: id, prompt, output."
    )
    assert_nothing_committed(out)


def test_null_empty_and_whitespace_instructions_are_rejected_per_row(local_ray, tmp_path):
    case = bad_inputs.blank_instructions(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    _, rejected = assert_committed(out, summary, case.good_ids, case.rejects)
    assert {row["reject_detail"] for row in rejected} == {"instruction is null or empty"}
    assert summary["rejected_by_reason"] == {"input:missing_instruction": 3}


def test_int_column_mapped_as_instruction_is_a_clear_error(tmp_path):
    case = bad_inputs.int_instruction(tmp_path / "in")
    out = tmp_path / "out"
    done = run_cli(tmp_path, job_data(case, out))
    assert_cli_error(
        done, f"Column 'question_no' in {case.bad_file} has type int64; it must hold text "
        "(string).")
    assert not out.exists()


def test_list_column_mapped_as_instruction_is_a_clear_error(local_ray, tmp_path):
    case = bad_inputs.list_instruction(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as error:
        run_job(make_job(case, out))
    assert str(error.value) == (
        f"Column 'turns' in {case.bad_file} has type list<item: string>; it must hold text "
        "(string)."
    )
    assert not out.exists()


def test_a_number_among_jsonl_instruction_strings_fails_the_file_clearly(local_ray, tmp_path):
    # pyarrow infers one type per column; a line that breaks it is a file-level error that
    # names the file, the column and the line (0-based row in pyarrow's words)
    case = bad_inputs.mixed_types_jsonl(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as error:
        run_job(make_job(case, out))
    assert str(error.value) == (
        f"Cannot read input file {case.bad_file} as jsonl: JSON parse error: "
        "Column(/instruction) changed from string to number in row 1"
    )
    assert not out.exists()


# ---- size and encoding -------------------------------------------------------------------------


def test_one_megabyte_instruction_is_rejected_too_long_and_a_raised_limit_lets_it_through(
    local_ray, tmp_path
):
    case = bad_inputs.huge_instruction(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    _, rejected = assert_committed(out, summary, case.good_ids, case.rejects)
    length = len(rejected[0]["instruction"])
    assert length >= bad_inputs.HUGE_CHARS - 12
    assert rejected[0]["reject_detail"] == f"{length} chars > input.max_row_chars 200000"

    raised = tmp_path / "out-raised"
    summary = run_job(make_job(case, raised, max_row_chars=2_000_000))
    kept, _ = assert_committed(raised, summary, [*case.good_ids, "bad-huge"], {})
    assert max(len(row["instruction"]) for row in kept) == length


def test_invalid_utf8_jsonl_lines_are_rejected_per_line_not_per_file(local_ray, tmp_path):
    case = bad_inputs.invalid_utf8_jsonl(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    kept, rejected = read_folder(out / "data"), read_folder(out / "_rejects")
    assert (out / "_SUCCESS").is_file()
    assert sorted(row["id"] for row in kept) == sorted(case.good_ids)
    assert sorted(row["reject_detail"] for row in rejected) == [
        'line 2 is not valid UTF-8 (invalid continuation byte at byte 41 of the line): '
        '{"id": "bad-latin1", "instruction": "Caf\\xe9 au lait: describe it."}',
        'line 4 is not valid UTF-8 (invalid start byte at byte 25 of the line): '
        '{"id": "bad-key", "instr\\xffuction": "What is this?"}',
    ]
    for row in rejected:
        assert (row["reject_step"], row["reject_reason"]) == ("input", "unreadable_line")
        assert row["instruction"] is None and row["output"] is None
        assert len(row["id"]) == 16 and row["source_id"] == row["id"]
    assert len({row["id"] for row in rejected}) == 2
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (6, 4, 2)
    assert summary["rejected_by_reason"] == {"input:unreadable_line": 2}

    # the ids of unreadable lines are stable across runs
    again = tmp_path / "again"
    run_job(make_job(case, again))
    assert sorted(r["id"] for r in read_folder(again / "_rejects")) == sorted(
        r["id"] for r in rejected)


def test_binary_parquet_column_is_text_when_utf8_and_a_per_row_reject_when_not(
    local_ray, tmp_path
):
    case = bad_inputs.binary_text_parquet(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    kept, rejected = assert_committed(out, summary, case.good_ids, case.rejects)
    assert all(isinstance(row["instruction"], str) and row["instruction"] for row in kept)
    assert rejected[0]["instruction"] is None
    assert rejected[0]["reject_detail"] == (
        "column 'instruction' (instruction) is not valid UTF-8: \\xff\\xfe\\x00 not text")


def test_invalid_utf8_in_a_parquet_string_column_is_a_per_row_reject(local_ray, tmp_path):
    case = bad_inputs.invalid_utf8_string_parquet(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    _, rejected = assert_committed(out, summary, case.good_ids, case.rejects)
    assert rejected[0]["reject_detail"] == (
        "column 'instruction' (instruction) is not valid UTF-8: caf\\xe9")


# ---- broken and empty files --------------------------------------------------------------------


TRUNCATED_MESSAGE = (
    "Cannot read input file {path} as parquet: Parquet magic bytes not found in footer. Either "
    "the file is corrupted or this is not a parquet file."
)


def test_truncated_parquet_among_good_ones_fails_the_run_naming_it(local_ray, tmp_path):
    case = bad_inputs.truncated_parquet(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as error:
        run_job(make_job(case, out))
    assert str(error.value).splitlines()[0] == TRUNCATED_MESSAGE.format(path=case.bad_file)
    assert_nothing_committed(out)


def test_errors_raised_in_ray_tasks_reach_the_user_as_one_clean_paragraph(tmp_path):
    case = bad_inputs.truncated_parquet(tmp_path / "in")
    out = tmp_path / "out"
    done = run_cli(tmp_path, job_data(case, out))
    assert_nothing_committed(out)
    message = TRUNCATED_MESSAGE.format(path=case.bad_file)
    assert done.returncode == 1
    assert done.stderr.endswith(f"error: {message}\n"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr


def test_empty_parquet_commits_an_empty_output(local_ray, tmp_path):
    case = bad_inputs.empty_parquet(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    assert_committed(out, summary, [], {})
    assert json.loads((out / "_manifest.json").read_text())["rows"] == 0


def test_empty_parquet_through_a_chain_of_steps_commits_an_empty_output(local_ray, tmp_path):
    # Ray Data passes an empty block on without a schema after any map: dedup must cope
    case = bad_inputs.empty_parquet(tmp_path / "in")
    out = tmp_path / "out"
    steps = [{"kind": "filter", "max_chars": 100}, {"kind": "dedup_exact"},
             {"kind": "dedup_near"}]
    summary = run_job(make_job(case, out, steps))
    assert_committed(out, summary, [], {})
    assert summary["accounting"]["input_rows_read"] == 0


def test_empty_jsonl_commits_an_empty_output(local_ray, tmp_path):
    case = bad_inputs.empty_jsonl(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    assert_committed(out, summary, [], {})
    assert summary["input"]["files"] == 1


def test_empty_files_among_good_ones_lose_no_row(local_ray, tmp_path):
    case = bad_inputs.empty_files_among_good(tmp_path / "in")
    out = tmp_path / "out"
    summary = run_job(make_job(case, out))
    assert_committed(out, summary, case.good_ids, {})
    assert summary["input"]["files"] == 5


# ---- ids ----------------------------------------------------------------------------------------

DUPLICATE_MESSAGE = (
    "The ids in column 'uid' (input.columns.id) of {uri} must be unique, but 2 ids repeat "
    "(4 rows carry them); e.g. id 'q-1' is in part-0.parquet (1 row) and part-1.jsonl (1 row). "
    "Make the ids unique, or drop input.columns.id so that content ids are generated."
)


def test_check_given_ids_unique(tmp_path):
    case = bad_inputs.duplicate_ids(tmp_path / "in")
    spec = InputSpec(uri=str(case.uri), columns=case.columns)
    shards = list_input_shards(spec)
    with pytest.raises(InputDataError) as error:
        check_given_ids_unique(spec, shards)
    assert str(error.value) == DUPLICATE_MESSAGE.format(uri=case.uri)

    # unique given ids (empty and null ones get content ids), an id column only by default,
    # and no id column at all all pass
    check_given_ids_unique(spec, shards[:1])
    check_given_ids_unique(InputSpec(uri=str(case.uri)), shards)
    check_given_ids_unique(InputSpec(uri=str(case.uri), columns={"id": None}), shards)

    # one file with the repeat inside it
    part = InputShard(str(case.uri / "part-1.jsonl"), "jsonl")
    with pytest.raises(InputDataError, match=r"1 id repeats \(2 rows carry it\); e\.g\. id "
                       r"'q-2' is in part-1\.jsonl \(2 rows\)\. Make the ids unique"):
        check_given_ids_unique(spec, [part])

    # the explicit id column must exist in every file
    other = InputSpec(uri=str(case.uri), columns={"id": "key"})
    with pytest.raises(InputDataError, match=r"part-0\.parquet has no column 'key' "
                       r"\(input\.columns\.id\)\. Its columns are: uid, instruction\."):
        check_given_ids_unique(other, shards)


def test_duplicate_given_ids_fail_the_run_before_any_work(local_ray, tmp_path):
    # needs pipeline.run_job to call check_given_ids_unique right after check_first_shard
    case = bad_inputs.duplicate_ids(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(InputDataError) as error:
        run_job(make_job(case, out))
    assert str(error.value) == DUPLICATE_MESSAGE.format(uri=case.uri)
    assert not out.exists()


# ---- model output ------------------------------------------------------------------------------


@pytest.mark.integration  # the bundled model
def test_prompt_injection_row_is_answered_or_rejected_never_dropped(local_ray, tmp_path):
    case = bad_inputs.prompt_injection(tmp_path / "in")
    out = tmp_path / "out"
    # 16-token rewrites fail the checks (tests/test_checks_job.py): this is about the parse
    data = job_data(case, out, steps=[{"kind": "refine", "engine": "small", "checks": False}])
    data["engines"] = {"small": TINY_ENGINE}
    summary = run_job(parse_job(data))

    kept, rejected = read_folder(out / "data"), read_folder(out / "_rejects")
    assert (out / "_SUCCESS").is_file()
    by_id = {row["id"]: row for row in kept}
    for good in case.good_ids:  # the other rows are refined normally
        assert by_id[good]["refined_instruction"].strip()
        assert 1 <= by_id[good]["refine_completion_tokens"] <= 16
    if "bad-injection" in by_id:  # a parsed answer ...
        row = by_id["bad-injection"]
        assert isinstance(row["refined_instruction"], str) and row["refined_instruction"].strip()
        assert row["instruction"] == bad_inputs.INJECTION
        assert rejected == []
    else:  # ... or a rejection with the parse reason
        assert [row["id"] for row in rejected] == ["bad-injection"]
        assert rejected[0]["reject_step"] == "refine"
        assert rejected[0]["reject_reason"]
    assert summary["rows_in"] == 4
    assert summary["rows_out"] + summary["rows_rejected"] == 4
    assert sorted([*by_id, *(row["id"] for row in rejected)]) == sorted(
        [*case.good_ids, "bad-injection"])


# ---- where the input and output live -----------------------------------------------------------


def test_nonexistent_input_uri_is_a_clear_error(tmp_path):
    case = Case(tmp_path / "no-such-input")
    out = tmp_path / "out"
    done = run_cli(tmp_path, job_data(case, out))
    assert_cli_error(done, f"error: Input {case.uri} does not exist.")
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores file permissions")
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    case = bad_inputs.blank_instructions(tmp_path / "in")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    out = parent / "out"
    try:
        done = run_cli(tmp_path, job_data(case, out))
        assert_cli_error(
            done, f"error: Cannot create the output folder {out}: ", "Permission denied"
        )
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_unwritable_output_path_is_a_clear_error_even_for_root(tmp_path):
    # /sys refuses new folders to every user, root included (EPERM)
    out = Path("/sys/augment_ray_bad_inputs_out")
    if not Path("/sys").is_dir() or out.exists():
        pytest.skip("needs /sys")
    case = bad_inputs.blank_instructions(tmp_path / "in")
    done = run_cli(tmp_path, job_data(case, out))
    assert_cli_error(done, f"error: Cannot create the output folder {out}: ",
                     "Operation not permitted")
    assert not out.exists()


def s3_storage(local_s3, secret_env: str) -> dict:
    return {"endpoint": local_s3.endpoint, "region": "us-east-1", "addressing": "path",
            "access_key_id_env": local_s3.key_id_env, "secret_access_key_env": secret_env}


WRONG_SECRET = "WRONG-SECRET-bad-inputs-7Qz"


def test_wrong_s3_secret_for_the_input_is_a_storage_error_without_the_secret(
    local_s3, tmp_path
):
    import io

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(bad_inputs.good_rows(2)), sink)
    local_s3.client().put_object(Bucket=local_s3.bucket, Key="bad-inputs/in/part-0.parquet",
                                 Body=sink.getvalue())
    uri = f"s3://{local_s3.bucket}/bad-inputs/in"
    out = tmp_path / "out"
    data = job_data(Case(Path("unused")), out)
    data["input"] = {"uri": uri, "storage": s3_storage(local_s3, "BAD_INPUTS_WRONG_SECRET")}
    done = run_cli(tmp_path, data, env={"BAD_INPUTS_WRONG_SECRET": WRONG_SECRET})
    message = assert_cli_error(done, f"error: Cannot list {uri}: ",
                               "Check the credentials (env vars named in storage.*_env")
    everything = done.stdout + done.stderr
    assert WRONG_SECRET not in everything
    assert local_s3.secret_access_key not in everything
    assert "SignatureDoesNotMatch" in message or "403" in message or "ACCESS" in message.upper()
    assert not out.exists()


def test_wrong_s3_secret_for_the_output_is_a_storage_error_and_writes_nothing(
    local_s3, tmp_path, monkeypatch
):
    case = bad_inputs.blank_instructions(tmp_path / "in")
    monkeypatch.setenv("BAD_INPUTS_WRONG_SECRET", WRONG_SECRET)
    uri = f"s3://{local_s3.bucket}/bad-inputs/out"
    data = job_data(case, Path("unused"))
    data["output"] = {"uri": uri, "storage": s3_storage(local_s3, "BAD_INPUTS_WRONG_SECRET")}
    with pytest.raises(StorageError) as error:
        run_job(parse_job(data))
    message = str(error.value)
    assert uri in message
    assert "Check the credentials" in message
    assert WRONG_SECRET not in message and local_s3.secret_access_key not in message
    listing = local_s3.client().list_objects_v2(Bucket=local_s3.bucket, Prefix="bad-inputs/out")
    assert listing.get("KeyCount", 0) == 0
