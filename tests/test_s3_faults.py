"""Object-store faults: a job whose every S3 request goes through tests/s3_faults.py's proxy in
front of the local S3 server. At 10% faults on every kind of request (more on listings and
copies; 503 SlowDown, 500, resets, delays past the request timeout) the run commits exactly the
fault-free output; a persistent failure (every staged write, the commit's copies, _SUCCESS)
fails the run with one paragraph naming the object, and nothing is committed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from s3_faults import OPERATIONS, FaultPlan, S3FaultProxy

from augment_ray.config.base import StorageOptions
from augment_ray.config.job import parse_job
from augment_ray.errors import StorageError
from augment_ray.io.write import commit
from augment_ray.pipeline import run_job
from augment_ray.storage import location

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "augment_ray.cli"]
SHARDS, ROWS_PER_SHARD = 4, 20
PREFIX = "faults"
# the share of each kind of request that fails in the survivable run
SURVIVABLE = FaultPlan({"read": 0.1, "write": 0.1, "head": 0.1, "delete": 0.1,
                        "list": 0.25, "copy": 0.25}, delay_s=2.5, seed=3,
                       kinds=(("slowdown", 0.3), ("internal", 0.3), ("reset", 0.2),
                              ("delay", 0.2)))


def input_rows(shard: int) -> list[dict]:
    """Rows with exact duplicates across shards and rows the filter rejects."""
    rows = []
    for i in range(ROWS_PER_SHARD):
        n = shard * ROWS_PER_SHARD + i
        question = f"What is {n % 50} plus {n % 50 + 1}?"  # n and n + 50 are duplicates
        answer = "" if n % 11 == 0 else f"It is {2 * (n % 50) + 1}."
        rows.append({"id": f"row-{n:04d}", "instruction": question, "output": answer})
    return rows


@pytest.fixture(scope="module")
def ray_address(local_s3, local_ray) -> str:
    """The module's Ray (started after local_s3 set the credentials: workers inherit them)."""
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def proxy(local_s3):
    faulty = S3FaultProxy(local_s3.endpoint).start()
    yield faulty
    faulty.stop()


@pytest.fixture(scope="module")
def shards(local_s3) -> None:
    client = local_s3.client()
    for shard in range(SHARDS):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(input_rows(shard)), sink)
        client.put_object(Bucket=local_s3.bucket, Key=f"{PREFIX}/in/part-{shard}.parquet",
                          Body=sink.getvalue().to_pybytes())


def job_spec(local_s3, name: str, endpoint: str, **storage: object) -> dict:
    options = {"endpoint": endpoint, "region": "us-east-1", "addressing": "path",
               "access_key_id_env": local_s3.key_id_env,
               "secret_access_key_env": local_s3.secret_env, **storage}
    base = f"s3://{local_s3.bucket}/{PREFIX}"
    return {
        "name": "s3-faults",
        "input": {"uri": f"{base}/in/", "storage": options},
        "output": {"uri": f"{base}/{name}/", "mode": "overwrite", "storage": options,
                   "max_rows_per_file": 16},
        "steps": [{"kind": "filter"}, {"kind": "dedup_exact"}],
    }


def run_cli(tmp_path: Path, spec: dict, ray_address: str) -> subprocess.CompletedProcess:
    job_file = tmp_path / f"{Path(spec['output']['uri']).name}.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    return subprocess.run([*CLI, "run", str(job_file), "--ray-address", ray_address],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def keys(local_s3, name: str) -> list[str]:
    listing = local_s3.client().list_objects_v2(Bucket=local_s3.bucket, Prefix=f"{PREFIX}/{name}/")
    return sorted(item["Key"].removeprefix(f"{PREFIX}/{name}/")
                  for item in listing.get("Contents", []))


def committed_rows(local_s3, name: str) -> dict[str, list[dict]]:
    """data/ and _rejects/ of an output, each folder's rows sorted by id, read with boto3. Which
    write task (so which file) a row lands in depends on scheduling, so files are not compared."""
    client, found = local_s3.client(), {"data": [], "_rejects": []}
    for key in keys(local_s3, name):
        folder = key.split("/")[0]
        if key.endswith(".parquet") and folder in found:
            body = client.get_object(Bucket=local_s3.bucket, Key=f"{PREFIX}/{name}/{key}")
            found[folder] += pq.read_table(pa.BufferReader(body["Body"].read())).to_pylist()
    return {folder: sorted(rows, key=lambda row: row["id"]) for folder, rows in found.items()}


def assert_one_paragraph_naming(result: subprocess.CompletedProcess, pattern: str,
                                local_s3) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in output
    for secret in (local_s3.secret_access_key, local_s3.access_key_id,
                   os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in output


@pytest.fixture(scope="module")
def fault_free(local_s3, ray_address, shards) -> dict[str, list[dict]]:
    run_job(parse_job(job_spec(local_s3, "clean", local_s3.endpoint)))
    return committed_rows(local_s3, "clean")


def test_ten_percent_faults_commit_exactly_the_fault_free_output(
        tmp_path, local_s3, proxy, ray_address, fault_free):
    proxy.reset(SURVIVABLE)
    # requests the proxy delays past request_timeout_s are abandoned and retried. Legacy mode
    # backs off in milliseconds where standard waits up to seconds (10 s more here; the
    # benchmark measures both); the failing runs below use standard, the default
    spec = job_spec(local_s3, "faulty", proxy.url, request_timeout_s=1.0, connect_timeout_s=1.0,
                    retry_mode="legacy")
    result = run_cli(tmp_path, spec, ray_address)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "_SUCCESS" in keys(local_s3, "faulty")
    assert committed_rows(local_s3, "faulty") == fault_free
    assert len(fault_free["data"]) > 30 and len(fault_free["_rejects"]) > 30
    # every kind of request met faults, and of each kind of fault some
    assert all(proxy.failed(operation) for operation in OPERATIONS), proxy.counts
    kinds = {outcome for (_, outcome) in proxy.counts}
    assert kinds == {"ok", "slowdown", "internal", "reset", "delay"}, proxy.counts


def test_every_staged_write_failing_fails_the_run_naming_the_object(
        tmp_path, local_s3, proxy, ray_address, shards):
    staged_parquet = r"/_staging/.+\.parquet$"
    proxy.reset(FaultPlan({"write": 1.0}, kinds=(("slowdown", 1.0),), key_pattern=staged_parquet))
    result = run_cli(tmp_path, job_spec(local_s3, "no-writes", proxy.url, max_attempts=2),
                     ray_address)
    bucket = re.escape(local_s3.bucket)
    assert_one_paragraph_naming(
        result, rf"Cannot write s3://{bucket}/{PREFIX}/no-writes/_staging/(data|_rejects)/"
        r"part-\d{5}-\d{4}\.parquet: .*(SLOW_DOWN|SlowDown|reduce your request rate).* "
        r"through storage\.max_attempts tries, or.*retry quota ran out.*"
        r"storage\.retry_mode: legacy", local_s3)
    assert "_SUCCESS" not in keys(local_s3, "no-writes")
    assert proxy.failed("write") >= 2


@pytest.mark.parametrize(("plan", "pattern"), [
    (FaultPlan({"copy": 1.0}, kinds=(("internal", 1.0),)),
     r"Cannot move s3://{out}/_staging/data/part-00000-0000\.parquet to "
     r"s3://{out}/data/part-00000-0000\.parquet \(the commit\): .*INTERNAL"),
    (FaultPlan({"write": 1.0}, kinds=(("slowdown", 1.0),), key_pattern="_SUCCESS$"),
     r"Cannot write s3://{out}/_SUCCESS: .*SLOW_DOWN"),
], ids=["commit-copy", "success-marker"])
def test_a_failing_commit_names_its_object_and_commits_nothing(local_s3, proxy, plan, pattern):
    name = f"no-commit-{len(plan.shares)}-{plan.key_pattern is None}"
    client = local_s3.client()
    for folder in ("data", "_rejects"):
        client.put_object(Bucket=local_s3.bucket,
                          Key=f"{PREFIX}/{name}/_staging/{folder}/part-00000-0000.parquet",
                          Body=b"staged")
    options = job_spec(local_s3, name, proxy.url, max_attempts=2)["output"]["storage"]
    output = location(f"s3://{local_s3.bucket}/{PREFIX}/{name}", StorageOptions(**options))
    manifest = {"run_id": "r1", "files": ["data/part-00000-0000.parquet"],
                "reject_files": ["_rejects/part-00000-0000.parquet"]}
    proxy.reset(plan)
    with pytest.raises(StorageError) as error:
        commit(output, manifest, {"rows_out": 0})
    out = re.escape(f"{local_s3.bucket}/{PREFIX}/{name}")
    assert re.search(pattern.format(out=out), str(error.value)), str(error.value)
    assert "\n" not in str(error.value)
    assert "_SUCCESS" not in keys(local_s3, name)
    assert proxy.failed() == 2  # max_attempts: 2
