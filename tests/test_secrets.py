"""Sentinel secrets: plant recognizable secrets, run the real `augment-ray` CLI as a subprocess
against the real local S3 server (the `local_s3` fixture, IAM auth on), and search every artifact
for them: the CLI's stdout and stderr, every object the run left in the bucket, and every file of
the run's own Ray session (a private RAY_TMPDIR per CLI call).

Each search is shown to look at real content: the artifacts are listed (never empty) and a known
non-secret string (job name, run id, ...) is found in them, so a search that reads nothing fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
JOB_NAME = "secret-canary-job"
PREFIX = "secrets"  # everything this module writes lives under s3://BUCKET/secrets/
# a wrong secret that is itself a sentinel: refused by the server, and must never be echoed
WRONG_SECRET = "SENTINEL-wrong-secret-7f3a9c1d2e4b"
WRONG_SECRET_ENV = "AUGMENT_RAY_TEST_WRONG_SECRET"
# a password inside a URI (s3://USER:PASSWORD@bucket/...)
URI_USER = "SENTINELURIUSER"
URI_PASSWORD = "SENTINEL-uri-password-5b8e0a"
# shaped like an Aliyun AccessKeySecret (30 letters and digits): a valid env var NAME, so a user
# who pastes it into storage.secret_access_key_env gets past validation
PASTED_SECRET = "SentinelPasted7f3aK9q2Lw8xZuQ"
CLI_TIMEOUT = 300


# ---- helpers ------------------------------------------------------------------------------------


def needles(secret: str) -> list[bytes]:
    """The secret, its first 12 characters, and its URL-quoted form (if different)."""
    found = [secret, secret[:12]]
    if quote(secret, safe="") != secret:
        found.append(quote(secret, safe=""))
    return [n.encode() for n in found]


def leaks(artifacts: dict[str, bytes], secret: str) -> list[str]:
    """'ARTIFACT: NEEDLE' for every sentinel form found in any artifact."""
    return [
        f"{name}: {needle.decode()!r}"
        for name, blob in artifacts.items()
        for needle in needles(secret)
        if needle in blob
    ]


def found_in(artifacts: dict[str, bytes], text: str) -> list[str]:
    return [name for name, blob in artifacts.items() if text.encode() in blob]


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    ray_tmp: Path

    @property
    def output(self) -> bytes:
        return (self.stdout + "\n" + self.stderr).encode()

    def ray_files(self) -> dict[str, bytes]:
        """Every regular file under this call's Ray temp dir (symlinks, sockets skipped)."""
        files = {}
        for path in sorted(self.ray_tmp.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                files[str(path.relative_to(self.ray_tmp))] = path.read_bytes()
            except OSError:  # a file Ray removed while we walked
                continue
        return files

    def describe(self) -> str:
        return f"augment-ray {' '.join(self.args)} -> {self.returncode}\n{self.stdout}{self.stderr}"


def cli(*args: str, env: dict[str, str], cwd: Path) -> CliResult:
    """`python -m augment_ray.cli ARGS` with its own short RAY_TMPDIR (Ray's unix sockets live
    under it, and their paths must stay under ~100 characters)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="arsec-", dir="/tmp"))
    full_env = {**env, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    full_env.pop("RAY_ADDRESS", None)  # a private local Ray, never someone else's cluster
    proc = subprocess.run(
        [sys.executable, "-m", "augment_ray.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )
    return CliResult(list(args), proc.returncode, proc.stdout, proc.stderr, ray_tmp)


def storage(local_s3, secret_env: str) -> dict[str, str]:
    return {
        "endpoint": local_s3.endpoint,
        "region": "us-east-1",
        "addressing": "path",
        "access_key_id_env": local_s3.key_id_env,
        "secret_access_key_env": secret_env,
    }


def job_dict(local_s3, *, name: str = JOB_NAME, input_uri: str, output_uri: str,
             input_secret_env: str | None = None,
             output_secret_env: str | None = None) -> dict:
    return {
        "name": name,
        "input": {"uri": input_uri,
                  "storage": storage(local_s3, input_secret_env or local_s3.secret_env)},
        "output": {"uri": output_uri,
                   "storage": storage(local_s3, output_secret_env or local_s3.secret_env)},
        "steps": [{"kind": "filter", "min_chars": 10}],
    }


def write_job(folder: Path, file_name: str, data: dict) -> Path:
    path = folder / file_name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bucket_objects(local_s3, prefix: str) -> dict[str, bytes]:
    """Every object under prefix, read back byte for byte with boto3."""
    client = local_s3.client()
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=local_s3.bucket,
                                                                   Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=local_s3.bucket, Key=item["Key"])["Body"].read()
            objects[f"s3://{local_s3.bucket}/{item['Key']}"] = body
    return objects


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_env(local_s3) -> dict[str, str]:
    """The environment the local_s3 fixture set up (the real key pair in its env vars), plus the
    wrong sentinel secret in an env var of its own."""
    env = dict(os.environ)
    env[WRONG_SECRET_ENV] = WRONG_SECRET
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secrets")


@pytest.fixture(scope="module")
def input_uri(local_s3) -> str:
    """Two Parquet shards under s3://BUCKET/secrets/in/, put there with boto3; one row is too
    short for the filter step, so the run writes _rejects/ as well as data/."""
    client = local_s3.client()
    rows = [{"instruction": f"Please answer question number {i}?", "output": f"Answer {i}."}
            for i in range(8)]
    rows[5]["instruction"] = "Hi?"
    for shard in range(2):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[shard * 4:shard * 4 + 4]), sink)
        client.put_object(Bucket=local_s3.bucket, Key=f"{PREFIX}/in/part-{shard}.parquet",
                          Body=sink.getvalue().to_pybytes())
    return f"s3://{local_s3.bucket}/{PREFIX}/in/"


@dataclass
class GoodRun:
    result: CliResult
    output_uri: str
    objects: dict[str, bytes]
    run_id: str


@pytest.fixture(scope="module")
def good_run(local_s3, base_env, workdir, input_uri) -> Iterator[GoodRun]:
    """One successful `augment-ray run` through the real CLI, reading from and writing to the
    bucket with the real key pair (named by env var in the job file)."""
    output_uri = f"s3://{local_s3.bucket}/{PREFIX}/out/"
    job = write_job(workdir, "job.yaml",
                    job_dict(local_s3, input_uri=input_uri, output_uri=output_uri))
    result = cli("run", str(job), env=base_env, cwd=workdir)
    assert result.returncode == 0, result.describe()
    objects = bucket_objects(local_s3, f"{PREFIX}/out/")
    manifest = json.loads(objects[f"{output_uri}_manifest.json"])
    yield GoodRun(result, output_uri, objects, manifest["run_id"])
    shutil.rmtree(result.ray_tmp, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[list[CliResult]]:
    """Removes the Ray temp dirs of the CLI calls a test appends."""
    results: list[CliResult] = []
    yield results
    for result in results:
        shutil.rmtree(result.ray_tmp, ignore_errors=True)


# ---- (1) a successful run -----------------------------------------------------------------------


def test_successful_run_cli_output_has_no_secret(local_s3, good_run):
    artifacts = {"cli stdout+stderr": good_run.result.output}
    assert found_in(artifacts, good_run.run_id), good_run.result.describe()
    assert found_in(artifacts, JOB_NAME)
    assert not leaks(artifacts, local_s3.secret_access_key)
    assert not leaks(artifacts, WRONG_SECRET)


def test_successful_run_bucket_objects_have_no_secret(local_s3, good_run):
    objects = good_run.objects
    names = {key.removeprefix(good_run.output_uri) for key in objects}
    assert {"_SUCCESS", "_manifest.json", "_summary.json", "_STARTED"} <= names, sorted(names)
    assert any(name.startswith("data/") for name in names), sorted(names)
    assert any(name.startswith("_rejects/") for name in names), sorted(names)
    # the search reads real content: the run id and job name are in the JSON objects
    assert found_in(objects, good_run.run_id)
    assert found_in(objects, JOB_NAME)
    # ... and the Parquet shards are the real ones (magic bytes at both ends)
    for key, body in objects.items():
        if key.endswith(".parquet"):
            assert body[:4] == body[-4:] == b"PAR1", key
    assert not leaks(objects, local_s3.secret_access_key)
    assert not leaks(objects, WRONG_SECRET)


def test_successful_run_ray_session_files_have_no_secret(local_s3, good_run):
    files = good_run.result.ray_files()
    # the run used this Ray temp dir: a session with its logs is there
    logs = [name for name in files if "/logs/" in name]
    assert logs, sorted(files)
    assert sum(len(blob) for blob in files.values()) > 0
    # and the search reads real content: Ray Data logged this run's dataset (its read is a
    # MapBatches operator) in the session's ray-data logs
    assert any("/ray-data/" in name for name in found_in(files, "MapBatches")), sorted(files)
    assert not leaks(files, local_s3.secret_access_key)
    assert not leaks(files, WRONG_SECRET)


# ---- (2) failing runs must not echo a secret ----------------------------------------------------


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_wrong_secret_is_refused_and_not_echoed(local_s3, base_env, workdir, input_uri,
                                                cleanup, side, debug):
    output_uri = f"s3://{local_s3.bucket}/{PREFIX}/wrong-{side}-{int(debug)}/"
    data = job_dict(local_s3, input_uri=input_uri, output_uri=output_uri,
                    **{f"{side}_secret_env": WRONG_SECRET_ENV})
    job = write_job(workdir, f"wrong-{side}.yaml", data)
    result = cli("run", str(job), *(["--debug"] if debug else []), env=base_env, cwd=workdir)
    cleanup.append(result)
    # it failed, and for the right reason: the server refused the wrong secret
    assert result.returncode == 1, result.describe()
    assert "Check the credentials" in result.stderr, result.describe()
    artifacts = {"cli stdout+stderr": result.output, **result.ray_files(),
                 **bucket_objects(local_s3, f"{PREFIX}/wrong-{side}-{int(debug)}/")}
    assert found_in(artifacts, "error:")
    assert not leaks(artifacts, WRONG_SECRET), result.describe()
    assert not leaks(artifacts, local_s3.secret_access_key), result.describe()

    validated = cli("validate", str(job), env=base_env, cwd=workdir)
    cleanup.append(validated)
    assert validated.returncode == 0, validated.describe()
    assert JOB_NAME in validated.stdout
    assert not leaks({"validate": validated.output}, WRONG_SECRET)


def test_summary_command_does_not_echo_secrets(local_s3, base_env, workdir, good_run, cleanup):
    """`augment-ray summary` takes no storage options: an s3:// URI goes through the AWS chain
    to AWS itself (pyarrow 26 ignores AWS_ENDPOINT_URL), which the local server cannot stand in
    for. So: the summary of the good run from a byte-for-byte local copy of its output, and a
    refused s3:// read with the wrong sentinel secret in the AWS chain."""
    local = workdir / "good-run-copy"
    for key, body in good_run.objects.items():
        if key.endswith("/"):  # a directory marker object (pyarrow writes them)
            continue
        target = local / key.removeprefix(good_run.output_uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    ok = cli("summary", str(local), env=base_env, cwd=workdir)
    cleanup.append(ok)
    assert ok.returncode == 0, ok.describe()
    assert good_run.run_id in ok.stdout and JOB_NAME in ok.stdout, ok.describe()
    assert not leaks({"summary": ok.output}, local_s3.secret_access_key)

    chain = {**base_env, "AWS_ACCESS_KEY_ID": local_s3.access_key_id,
             "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    refused = cli("summary", good_run.output_uri, env=chain, cwd=workdir)
    cleanup.append(refused)
    assert refused.returncode == 1, refused.describe()
    assert "error: cannot read" in refused.stderr.lower(), refused.describe()
    assert not leaks({"summary": refused.output}, WRONG_SECRET), refused.describe()
    assert not leaks({"summary": refused.output}, local_s3.secret_access_key)


def userinfo_uri(local_s3, folder: str) -> str:
    return f"s3://{URI_USER}:{URI_PASSWORD}@{local_s3.bucket}/{PREFIX}/{folder}/"


def test_password_in_input_uri_is_not_echoed_by_run(local_s3, base_env, workdir, cleanup):
    # storage.Location accepts s3://USER:PASSWORD@bucket/...: the URI travels into messages
    output_uri = f"s3://{local_s3.bucket}/{PREFIX}/userinfo-out/"
    data = job_dict(local_s3, input_uri=userinfo_uri(local_s3, "in"), output_uri=output_uri)
    job = write_job(workdir, "userinfo-input.yaml", data)
    result = cli("run", str(job), env=base_env, cwd=workdir)
    cleanup.append(result)
    assert result.returncode != 0, result.describe()
    artifacts = {"cli stdout+stderr": result.output, **result.ray_files(),
                 **bucket_objects(local_s3, f"{PREFIX}/userinfo-out/")}
    assert found_in(artifacts, "error:")
    assert not leaks(artifacts, URI_PASSWORD), result.describe()


def test_password_in_output_uri_is_not_echoed_by_run(local_s3, base_env, workdir, input_uri,
                                                     cleanup):
    data = job_dict(local_s3, input_uri=input_uri,
                    output_uri=userinfo_uri(local_s3, "userinfo-out2"))
    job = write_job(workdir, "userinfo-output.yaml", data)
    result = cli("run", str(job), env=base_env, cwd=workdir)
    cleanup.append(result)
    assert result.returncode != 0, result.describe()
    artifacts = {"cli stdout+stderr": result.output, **result.ray_files()}
    assert found_in(artifacts, "error:")
    assert not leaks(artifacts, URI_PASSWORD), result.describe()


def test_password_in_uri_is_not_echoed_by_summary(local_s3, base_env, workdir, cleanup):
    result = cli("summary", userinfo_uri(local_s3, "out"), env=base_env, cwd=workdir)
    cleanup.append(result)
    assert result.returncode != 0, result.describe()
    assert result.stderr.strip(), result.describe()
    assert not leaks({"summary": result.output}, URI_PASSWORD), result.describe()


def test_password_in_output_uri_is_not_echoed_by_validate(local_s3, base_env, workdir,
                                                          input_uri, cleanup):
    data = job_dict(local_s3, input_uri=input_uri,
                    output_uri=userinfo_uri(local_s3, "userinfo-out3"))
    job = write_job(workdir, "userinfo-validate.yaml", data)
    result = cli("validate", str(job), env=base_env, cwd=workdir)
    cleanup.append(result)
    assert JOB_NAME in result.output.decode() or "error:" in result.stderr, result.describe()
    assert not leaks({"validate": result.output}, URI_PASSWORD), result.describe()


# ---- (3) config-printing paths never print secret values ----------------------------------------


def test_validate_and_help_print_env_names_not_values(local_s3, base_env, workdir, input_uri,
                                                      cleanup):
    job = write_job(workdir, "valid.yaml", job_dict(
        local_s3, input_uri=input_uri, output_uri=f"s3://{local_s3.bucket}/{PREFIX}/v/"))
    assert local_s3.secret_env in job.read_text()  # the file names the env var ...
    assert local_s3.secret_access_key not in job.read_text()  # ... never its value
    outputs = {}
    for args in (["validate", str(job)], ["--help"], ["run", "--help"], ["validate", "--help"],
                 ["summary", "--help"], ["submit", "--help"], ["loop", "--help"]):
        result = cli(*args, env=base_env, cwd=workdir)
        cleanup.append(result)
        assert result.returncode == 0, result.describe()
        outputs[" ".join(args)] = result.output
    assert found_in(outputs, JOB_NAME) == [f"validate {job}"]
    assert found_in(outputs, "Usage:")
    for secret in (local_s3.secret_access_key, WRONG_SECRET):
        assert not leaks(outputs, secret)


@pytest.mark.parametrize("field", ["secret_access_key_env", "secret_access_key"])
def test_secret_pasted_into_the_job_file_is_not_echoed(local_s3, base_env, workdir, input_uri,
                                                       cleanup, field):
    """A user pastes the secret VALUE where the env var NAME goes (or into a field of its own):
    validation and the run may refuse it, but must not print it back."""
    data = job_dict(local_s3, input_uri=input_uri,
                    output_uri=f"s3://{local_s3.bucket}/{PREFIX}/pasted-{field}/")
    data["input"]["storage"][field] = PASTED_SECRET
    job = write_job(workdir, f"pasted-{field}.yaml", data)
    outputs = {}
    for command in ("validate", "run"):
        result = cli(command, str(job), env=base_env, cwd=workdir)
        cleanup.append(result)
        outputs[command] = result.output
        outputs.update(result.ray_files())
        assert result.returncode in (0, 1, 2), result.describe()
        assert "storage" in result.output.decode() or result.returncode == 0, result.describe()
    assert found_in(outputs, "error:")
    assert not leaks(outputs, PASTED_SECRET), outputs
