"""Object stores for real: s3:// and oss:// against a local S3-compatible server (moto, with IAM
authentication on), path-style and virtual-hosted, through augment_ray's storage, reader and
output preparation. The server comes from the `local_s3` fixture in conftest.py."""

from __future__ import annotations

import io
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.config.base import StorageOptions
from augment_ray.config.io import InputSpec
from augment_ray.errors import StorageError
from augment_ray.io.read import InputShard, list_input_shards, read_shard_batches, read_shards
from augment_ray.io.write import DATA_DIR, REJECTS_DIR, STAGING_DIR, commit, prepare_output
from augment_ray.storage import Location, location

TABLE = pa.table({
    "instruction": ["Name a prime.", "Say hi."],
    "output": ["7", "hi"],
    "topic": ["math", "chat"],
})
SHARED_KEY = "shared/part-0.parquet"  # written once with boto3, read by several tests


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.fixture(scope="module")
def shared(local_s3):
    """One Parquet object and a marker under s3://BUCKET/shared, put there by boto3 (not by the
    code under test)."""
    client = local_s3.client()
    client.put_object(Bucket=local_s3.bucket, Key=SHARED_KEY, Body=parquet_bytes(TABLE))
    client.put_object(Bucket=local_s3.bucket, Key="shared/_SUCCESS", Body=b"{}")
    return f"{local_s3.bucket}/{SHARED_KEY}"


def options(local_s3, **overrides) -> StorageOptions:
    values = {
        "endpoint": local_s3.endpoint,
        "region": "us-east-1",
        "addressing": "path",
        "access_key_id_env": local_s3.key_id_env,
        "secret_access_key_env": local_s3.secret_env,
        **overrides,
    }
    return StorageOptions(**values)


def keys_under(local_s3, prefix: str) -> list[str]:
    listing = local_s3.client().list_objects_v2(Bucket=local_s3.bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def read_all(spec: InputSpec, shard: InputShard) -> pa.Table:
    return pa.concat_tables(read_shard_batches(location(spec.uri, spec.storage), shard))


def write_list_read(local_s3, loc: Location) -> None:
    """Write a Parquet file and a marker through loc.fs, read the file back, then find and read
    it as input the way a job does."""
    fs = loc.fs
    part = loc.join("part-0.parquet")
    pq.write_table(TABLE, part.path, filesystem=fs)
    with fs.open_output_stream(loc.join("_SUCCESS").path) as stream:
        stream.write(b"{}")
    assert pq.read_table(part.path, filesystem=fs).equals(TABLE)

    # the object really is in the bucket, under the expected key
    key = part.path.removeprefix(f"{local_s3.bucket}/")
    assert keys_under(local_s3, key) == [key]

    spec = InputSpec(uri=loc.uri, storage=loc.options)
    shards = list_input_shards(spec)
    assert shards == [InputShard(part.path, "parquet")]  # the _SUCCESS marker is skipped
    assert read_all(spec, shards[0]).equals(TABLE)
    # a file URI is one shard too
    assert list_input_shards(InputSpec(uri=part.uri, storage=loc.options)) == shards

    # and the normalizing reader (the Ray Data UDF body) gets the rows
    batch = pa.table({"path": [part.path], "format": ["parquet"]})
    rows = pa.concat_tables(read_shards(batch, spec)).to_pylist()
    assert [row["instruction"] for row in rows] == TABLE["instruction"].to_pylist()
    assert [row["topic"] for row in rows] == TABLE["topic"].to_pylist()


# ---- (a) path-style ---------------------------------------------------------------------------


def test_path_style_write_list_and_read(local_s3):
    loc = Location(f"s3://{local_s3.bucket}/path-style", options(local_s3))
    start = len(local_s3.requests)
    write_list_read(local_s3, loc)
    sent = [r for r in local_s3.requests[start:] if not r[1].startswith("/moto-api")]
    # path-style: Host is the endpoint, the bucket is the first path segment
    assert sent
    assert all(host == f"127.0.0.1:{local_s3.port}" for host, _ in sent), sent
    assert all(path.startswith(f"/{local_s3.bucket}") for _, path in sent), sent


# ---- (b) virtual-hosted -----------------------------------------------------------------------


def virtual_host_failure(local_s3, error: Exception) -> str:
    """Why a virtual-hosted request to BUCKET.localhost may not have reached the server."""
    host = f"{local_s3.bucket}.localhost"
    try:
        resolved = sorted({info[4][0] for info in socket.getaddrinfo(host, local_s3.port)})
    except OSError as lookup:
        resolved = f"not resolved by the system resolver ({lookup})"
    return (
        f"virtual-hosted request to {host}:{local_s3.port} failed: {error}. The system resolver "
        f"gives {host} -> {resolved}. pyarrow's AWS SDK uses libcurl, which resolves *.localhost "
        "to loopback by itself (RFC 6761, curl >= 7.78); an older libcurl falls back to the "
        "system resolver, which needs an /etc/hosts entry (or nss-myhostname/systemd-resolved)."
    )


def test_virtual_hosted_write_list_and_read(local_s3):
    loc = Location(
        f"s3://{local_s3.bucket}/virtual",
        options(local_s3, endpoint=f"http://localhost:{local_s3.port}", addressing="virtual"),
    )
    start = len(local_s3.requests)
    try:
        write_list_read(local_s3, loc)
    except (OSError, StorageError) as error:
        pytest.fail(virtual_host_failure(local_s3, error))
    sent = [
        r for r in local_s3.requests[start:]
        if r[0] != f"127.0.0.1:{local_s3.port}"  # boto3's own checks go path-style
    ]
    # virtual-hosted: the bucket is in the Host header, not in the path
    assert sent
    assert all(host == f"{local_s3.bucket}.localhost:{local_s3.port}" for host, _ in sent), sent
    assert not any(path.startswith(f"/{local_s3.bucket}/") for _, path in sent), sent


# ---- (c) oss:// -------------------------------------------------------------------------------


def test_oss_scheme_reads_the_same_object_virtual_hosted(local_s3, shared, monkeypatch):
    # oss:// defaults: virtual-hosted addressing, keys from OSS_ACCESS_KEY_ID/_SECRET
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", local_s3.access_key_id)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", local_s3.secret_access_key)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # the OSS variables alone must do
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    spec = InputSpec(
        uri=f"oss://{local_s3.bucket}/shared",
        storage=StorageOptions(endpoint=f"http://localhost:{local_s3.port}"),
    )
    start = len(local_s3.requests)
    try:
        shards = list_input_shards(spec)
    except StorageError as error:
        pytest.fail(virtual_host_failure(local_s3, error))
    assert shards == [InputShard(shared, "parquet")]
    assert read_all(spec, shards[0]).equals(TABLE)
    sent = local_s3.requests[start:]
    assert sent
    assert all(host == f"{local_s3.bucket}.localhost:{local_s3.port}" for host, _ in sent), sent


# ---- (d) wrong secret, (e) missing bucket -----------------------------------------------------


def test_wrong_secret_is_a_storage_error_without_the_secret(local_s3, shared, monkeypatch):
    wrong = "WRONG-SECRET-k3Jq9"
    monkeypatch.setenv("AUGMENT_RAY_TEST_WRONG_SECRET", wrong)
    spec = InputSpec(
        uri=f"s3://{local_s3.bucket}/shared",
        storage=options(local_s3, secret_access_key_env="AUGMENT_RAY_TEST_WRONG_SECRET"),
    )
    with pytest.raises(StorageError) as error:
        list_input_shards(spec)
    message = str(error.value)
    assert wrong not in message
    assert local_s3.secret_access_key not in message
    assert spec.uri in message
    assert "Check the credentials" in message  # describe_os_error's hint for auth failures


def test_missing_bucket_as_input_is_a_clear_storage_error(local_s3):
    uri = "s3://no-such-bucket/in"
    with pytest.raises(StorageError) as error:
        list_input_shards(InputSpec(uri=uri, storage=options(local_s3)))
    assert uri in str(error.value)
    assert "does not exist" in str(error.value)


def test_missing_bucket_as_output_is_a_clear_storage_error(local_s3):
    loc = Location("s3://no-such-bucket/out", options(local_s3))
    with pytest.raises(StorageError) as error:
        prepare_output(loc, "error-if-exists")
    message = str(error.value)
    assert loc.uri in message
    assert "bucket does not exist" in message.lower() or "not found" in message.lower(), message


# ---- (f) output preparation -------------------------------------------------------------------


def test_prepare_output_refuses_then_overwrites_a_non_empty_prefix(local_s3):
    client = local_s3.client()
    client.put_object(Bucket=local_s3.bucket, Key="out/data/part-old.parquet", Body=b"old")
    client.put_object(Bucket=local_s3.bucket, Key="out/_SUCCESS", Body=b"{}")
    loc = Location(f"s3://{local_s3.bucket}/out", options(local_s3))

    with pytest.raises(StorageError) as error:
        prepare_output(loc, "error-if-exists")
    assert "already holds files" in str(error.value)
    assert "overwrite" in str(error.value)
    assert keys_under(local_s3, "out/") == ["out/_SUCCESS", "out/data/part-old.parquet"]

    prepare_output(loc, "overwrite")
    assert not [key for key in keys_under(local_s3, "out/") if not key.endswith("/")]
    for folder in (DATA_DIR, REJECTS_DIR):
        assert loc.join(STAGING_DIR).join(folder).file_info().type.name == "Directory"

    # a staged shard moves into data/ on commit; the staging prefix goes away
    client.put_object(Bucket=local_s3.bucket, Key="out/_staging/data/part-00000-0000.parquet",
                      Body=b"new")
    commit(loc, {"run_id": "r1", "files": ["data/part-00000-0000.parquet"],
                 "reject_files": []}, {"rows_out": 0})
    assert [k for k in keys_under(local_s3, "out/") if not k.endswith("/")] == [
        "out/_SUCCESS", "out/_manifest.json", "out/_summary.json",
        "out/data/part-00000-0000.parquet"]
    body = client.get_object(Bucket=local_s3.bucket, Key="out/_SUCCESS")["Body"].read()
    assert json.loads(body) == {"run_id": "r1"}


def test_prepare_output_on_a_new_prefix_ignores_look_alike_neighbours(local_s3):
    # "fresh-other/..." shares the prefix string "fresh" but is not under s3://BUCKET/fresh/
    local_s3.client().put_object(Bucket=local_s3.bucket, Key="fresh-other/x.parquet", Body=b"x")
    loc = Location(f"s3://{local_s3.bucket}/fresh", options(local_s3))
    prepare_output(loc, "error-if-exists")
    assert loc.join(STAGING_DIR).join(DATA_DIR).file_info().type.name == "Directory"
    assert keys_under(local_s3, "fresh-other/") == ["fresh-other/x.parquet"]
