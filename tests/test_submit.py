"""Nightly operation for real: `augment-ray submit` (real `ray job submit`) to a real local Ray
head, reading and writing sharded Parquet in a real local S3-compatible server, path-style s3://
and OSS-style virtual-hosted oss://; date templates; a rerun of a finished date is a no-op."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "augment_ray.cli"]
DS = "2026-11-21"


@pytest.fixture(scope="module")
def ray_head(local_s3) -> Iterator[str]:
    """A Ray head of our own (tests/ray_cluster.py): own temp dir and ports, no token auth on
    loopback, stopped by its process group. Started after local_s3, so its workers see no real
    credentials, only the dummy ones. Yields the dashboard URL."""
    cluster = LocalRayCluster(head_cpus=2).start()
    try:
        yield cluster.dashboard_url
    finally:
        cluster.stop()


def upload_shards(local_s3, prefix: str, rows: list[dict]) -> None:
    client = local_s3.client()
    half = len(rows) // 2
    for index, part in enumerate((rows[:half], rows[half:])):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(part), sink)
        client.put_object(Bucket=local_s3.bucket, Key=f"{prefix}/part-{index}.parquet",
                          Body=sink.getvalue().to_pybytes())


def read_prefix(local_s3, prefix: str) -> dict[str, bytes]:
    client = local_s3.client()
    listed = client.list_objects_v2(Bucket=local_s3.bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix) + 1 :]: client.get_object(
        Bucket=local_s3.bucket, Key=item["Key"])["Body"].read() for item in listed}


def nightly_job(folder: Path, local_s3, scheme: str, addressing: str, host: str) -> Path:
    storage = {"endpoint": f"http://{host}:{local_s3.port}", "region": "us-east-1",
               "addressing": addressing, "access_key_id_env": local_s3.key_id_env,
               "secret_access_key_env": local_s3.secret_env}
    base = f"{scheme}://{local_s3.bucket}/nightly-{scheme}"
    job = {
        "name": f"nightly-{scheme}",
        "input": {"uri": f"{base}/raw/dt={{ds}}/", "storage": storage},
        "output": {"uri": f"{base}/augmented/dt={{ds}}/", "storage": storage},
        "engines": {"small": {"kind": "transformers", "model": "bundled", "num_cpus": 1,
                              "sampling": {"max_tokens": 8}}},
        # 8-token rewrites fail the checks (tests/test_checks_job.py tests those)
        "steps": [{"kind": "refine", "engine": "small", "checks": False}],
    }
    path = folder / f"nightly-{scheme}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def submit(job_file: Path, address: str, local_s3, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "submit", str(job_file), "--address", address, "--ds", DS,
         "--working-dir", str(job_file.parent), "--env", local_s3.key_id_env,
         "--env", local_s3.secret_env, *extra],
        capture_output=True, text=True, timeout=540, check=False,
    )


@pytest.mark.parametrize(
    ("scheme", "addressing", "host"),
    [("s3", "path", "127.0.0.1"), ("oss", "virtual", "localhost")],
)
def test_submit_runs_the_nightly_job_on_a_ray_head_against_a_bucket(
        ray_head, local_s3, tmp_path, scheme, addressing, host):
    rows = pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, 4).to_pylist()
    upload_shards(local_s3, f"nightly-{scheme}/raw/dt={DS}", rows)
    job_file = nightly_job(tmp_path, local_s3, scheme, addressing, host)

    first = submit(job_file, ray_head, local_s3, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    submission_id = f"augment-nightly-{scheme}-{DS}"
    assert f"Submitted {submission_id}" in first.stdout
    assert f"{submission_id}: SUCCEEDED" in first.stdout
    assert "ray job submit --address" in first.stdout  # the plain equivalent is shown
    # the job's log (`ray job logs`, streamed by --wait) carries the driver's progress lines
    assert re.search(r"progress: input 4/4 \(100%\) \| refine 4/4 \(100%\) [\d.]+ tok/s",
                     first.stdout + first.stderr), first.stdout[-3000:]
    # credentials travel by name only: their values are never printed
    assert local_s3.secret_access_key not in first.stdout + first.stderr

    written = read_prefix(local_s3, f"nightly-{scheme}/augmented/dt={DS}")
    assert "_SUCCESS" in written and "_manifest.json" in written
    summary = json.loads(written["_summary.json"])
    assert summary["rows_in"] == 4 and summary["rows_out"] + summary["rows_rejected"] == 4
    shards = [name for name in written if name.startswith("data/") and name.endswith(".parquet")]
    assert shards
    kept = pa.concat_tables([pq.read_table(pa.BufferReader(written[name])) for name in shards])
    assert len(kept) == summary["rows_out"] > 0
    assert set(kept["id"].to_pylist()) <= {r["id"] for r in rows}
    assert all(text.strip() for text in kept["refined_instruction"].to_pylist())
    assert local_s3.secret_access_key.encode() not in b"".join(written.values())

    # the same date again: found by its submission id, nothing runs
    again = submit(job_file, ray_head, local_s3, "--wait")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{submission_id} already succeeded for {DS}; nothing to do" in again.stdout
    from ray.job_submission import JobSubmissionClient

    ids = [job.submission_id for job in JobSubmissionClient(ray_head).list_jobs()]
    assert ids.count(submission_id) == 1 and f"{submission_id}-2" not in ids


def local_job(tmp_path: Path, **output) -> Path:
    source = tmp_path / "raw" / f"dt={DS}"
    source.mkdir(parents=True)
    rows = [{"id": f"r{i}", "instruction": f"Say {i}."} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), source / "part-0.parquet")
    job = {"name": "nightly-local", "input": {"uri": str(tmp_path / "raw" / "dt={ds}")},
           "output": {"uri": str(tmp_path / "out" / "dt={ds_nodash}"), **output},
           "steps": [{"kind": "dedup_exact"}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_committed_date_is_a_no_op_until_forced(tmp_path):
    job_file = local_job(tmp_path)
    first = run_cli("run", str(job_file), "--ds", DS)
    assert first.returncode == 0, first.stderr[-2000:]
    output = tmp_path / "out" / f"dt={DS.replace('-', '')}"
    run_id = json.loads((output / "_SUCCESS").read_text())["run_id"]

    again = run_cli("run", str(job_file), "--ds", DS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing to do" in again.stdout and run_id in again.stdout
    assert json.loads((output / "_SUCCESS").read_text())["run_id"] == run_id

    forced = run_cli("run", str(job_file), "--ds", DS, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((output / "_SUCCESS").read_text())["run_id"] != run_id

    # another spec on the same committed output is refused, not silently replaced
    changed = yaml.safe_load(job_file.read_text())
    changed["steps"] = []
    job_file.write_text(yaml.safe_dump(changed))
    refused = run_cli("run", str(job_file), "--ds", DS)
    assert refused.returncode == 1
    assert "holds a committed run of a different job spec" in refused.stderr


def test_another_date_reads_and_writes_its_own_partition(tmp_path):
    job_file = local_job(tmp_path)
    missing = run_cli("run", str(job_file), "--ds", "2026-11-22")
    assert missing.returncode == 1
    assert "dt=2026-11-22" in missing.stderr  # the rendered input path is named
    bad = run_cli("validate", str(job_file), "--ds", "2026-13-01")
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


def test_an_unfinished_attempt_of_the_same_job_is_started_over(tmp_path):
    job_file = local_job(tmp_path)
    assert run_cli("run", str(job_file), "--ds", DS).returncode == 0
    output = tmp_path / "out" / f"dt={DS.replace('-', '')}"
    (output / "_SUCCESS").unlink()  # as if the driver died before committing
    (output / "data" / "part-stray.parquet").write_bytes(b"partial")
    retried = run_cli("run", str(job_file), "--ds", DS)
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert (output / "_SUCCESS").exists()
    assert not (output / "data" / "part-stray.parquet").exists()
    # someone else's files are still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = run_cli("run", str(job_file), "--ds", DS, "--output", str(other))
    assert refused.returncode == 1 and "already holds files" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("problem", ["wrong secret", "missing bucket", "missing prefix"])
def test_object_store_problems_are_clear_errors_before_any_model_work(local_s3, tmp_path,
                                                                     problem):
    upload_shards(local_s3, "present/raw", [{"id": "a", "instruction": "x"},
                                            {"id": "b", "instruction": "y"}])
    bucket, prefix = local_s3.bucket, "present/raw"
    env = dict(os.environ)
    if problem == "wrong secret":
        env[local_s3.secret_env] = "not-the-secret-SENTINEL"
    elif problem == "missing bucket":
        bucket = "no-such-bucket"
    else:
        prefix = "nothing/here"
    storage = {"endpoint": local_s3.endpoint, "region": "us-east-1",
               "access_key_id_env": local_s3.key_id_env,
               "secret_access_key_env": local_s3.secret_env}
    job = {"input": {"uri": f"s3://{bucket}/{prefix}/", "storage": storage},
           "output": {"uri": f"s3://{local_s3.bucket}/out-{problem.replace(' ', '-')}/",
                      "storage": storage},
           # a model that does not exist: had model work started first, its error would show
           "engines": {"m": {"kind": "transformers", "model": str(tmp_path / "no-model")}},
           "steps": [{"kind": "refine", "engine": "m"}]}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    done = subprocess.run([*CLI, "run", str(job_file)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stderr
    assert "no-model" not in message and "Traceback" not in message
    expected = {"wrong secret": "credentials", "missing bucket": "no-such-bucket",
                "missing prefix": "nothing/here"}[problem]
    assert expected in message
    assert "SENTINEL" not in done.stdout + done.stderr
