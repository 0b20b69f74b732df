"""augment_ray.storage: URI -> path and filesystem, S3/OSS options, retry settings, credentials
kept out of pickles and error messages (no network: building an S3FileSystem does not connect);
then, against the local S3 server, the boto3 client and the reads that retry what the AWS SDK
does not."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from reverse_proxy import Answer, Forward, ProxyRequest, ReverseProxy, running
from s3_faults import classify, error_body

from augment_ray.config.base import StorageOptions
from augment_ray.config.job import parse_job
from augment_ray.errors import JobSpecError, ObjectReadError, StorageError
from augment_ray.io.committed import spec_digest
from augment_ray.retrying_reads import RetryingReadsHandler
from augment_ray.storage import (
    Location,
    boto3_client,
    describe_os_error,
    location,
    pyarrow_s3,
    s3_connection,
    s3_filesystem,
)

SENTINEL_KEY_ID = "SENTINEL-KEYID-456"
SENTINEL_SECRET = "SENTINEL-SECRET-123"
SENTINEL_TOKEN = "SENTINEL-TOKEN-789"


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch):
    """Keep the machine's own AWS/OSS settings out of these tests."""
    for name in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_ENDPOINT_URL", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET",
        "TEST_KEY_ID", "TEST_SECRET", "TEST_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def fs_options(fs: pafs.FileSystem) -> dict:
    """The options the S3FileSystem inside Location.fs (a PyFileSystem whose input files retry
    reads) was built with: what it pickles as."""
    assert isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingReadsHandler)
    return fs.handler.fs.__reduce__()[1][0]


def keyed(**extra) -> StorageOptions:
    return StorageOptions(access_key_id_env="TEST_KEY_ID", secret_access_key_env="TEST_SECRET",
                          **extra)


# ---- paths ------------------------------------------------------------------------------------


def test_relative_local_path_resolves_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = Location("data/in")
    assert loc.scheme == "file"
    assert loc.is_local
    assert loc.path == str(tmp_path.resolve() / "data" / "in")
    assert Path(loc.path).is_absolute()
    assert isinstance(loc.fs, pafs.LocalFileSystem)


def test_file_uri_and_home_are_local_absolute_paths(tmp_path, monkeypatch):
    loc = Location(f"file://{tmp_path}/x")
    assert loc.is_local
    assert loc.path == str(tmp_path.resolve() / "x")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Location("~/y").path == str(tmp_path.resolve() / "y")


def test_local_location_reads_what_was_written(tmp_path):
    (tmp_path / "f.txt").write_text("hi")
    loc = Location(str(tmp_path))
    info = loc.join("f.txt").file_info()
    assert info.type == pafs.FileType.File
    assert info.size == 2


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("s3://bucket/a/b", "bucket/a/b"),
        ("s3://bucket/a/b/", "bucket/a/b"),
        ("s3://bucket", "bucket"),
        ("oss://bucket/a/b.parquet", "bucket/a/b.parquet"),
    ],
)
def test_object_store_uri_path_is_bucket_and_key(uri, path):
    loc = Location(uri)
    assert not loc.is_local
    assert loc.path == path


def test_join_keeps_scheme_and_options():
    options = StorageOptions(region="eu-west-1")
    joined = Location("s3://bucket/out/", options).join("data", "part.parquet")
    assert joined.uri == "s3://bucket/out/data/part.parquet"
    assert joined.path == "bucket/out/data/part.parquet"
    assert joined.options == options


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "oss://"])
def test_missing_bucket_is_a_storage_error(uri):
    with pytest.raises(StorageError, match="names no bucket"):
        _ = Location(uri).path
    with pytest.raises(StorageError, match="names no bucket"):
        location(uri, None)  # validated when the location is made


def test_unknown_scheme_is_a_storage_error_on_fs():
    loc = Location("gs://x/y")
    assert loc.scheme == "gs"
    with pytest.raises(StorageError) as error:
        _ = loc.fs
    message = str(error.value)
    assert "gs://" in message
    assert "s3://" in message and "oss://" in message  # says what is supported


# ---- S3 / OSS filesystem options --------------------------------------------------------------


def test_s3_defaults_to_path_style_and_the_default_credential_chain():
    options = fs_options(Location("s3://bucket/p").fs)
    assert options["force_virtual_addressing"] is False
    assert options["endpoint_override"] == ""
    assert not options["access_key"]
    assert options["anonymous"] is False


def test_s3_endpoint_url_sets_scheme_host_and_region():
    fs = s3_filesystem("s3", StorageOptions(endpoint="http://127.0.0.1:9000", region="us-west-2"))
    options = fs_options(fs)
    assert options["endpoint_override"] == "127.0.0.1:9000"
    assert options["scheme"] == "http"
    assert options["region"] == "us-west-2"
    assert fs.handler.fs.region == "us-west-2"
    assert options["force_virtual_addressing"] is False


def test_bare_endpoint_host_means_https():
    options = fs_options(s3_filesystem("s3", StorageOptions(endpoint="minio.example.com:9000")))
    assert options["endpoint_override"] == "minio.example.com:9000"
    assert options["scheme"] == "https"


@pytest.mark.parametrize("endpoint", ["ftp://host", "http://", "s3://bucket"])
def test_bad_endpoint_is_a_storage_error(endpoint):
    with pytest.raises(StorageError, match=r"storage\.endpoint"):
        s3_filesystem("s3", StorageOptions(endpoint=endpoint))


def test_addressing_can_be_forced_either_way():
    virtual = s3_filesystem("s3", StorageOptions(addressing="virtual"))
    assert fs_options(virtual)["force_virtual_addressing"] is True
    path = s3_filesystem("oss", StorageOptions(region="cn-hangzhou", addressing="path"))
    assert fs_options(path)["force_virtual_addressing"] is False


def test_oss_without_endpoint_or_region_is_a_storage_error():
    loc = Location("oss://bucket/p")
    with pytest.raises(StorageError, match=r"storage\.endpoint") as error:
        _ = loc.fs
    assert "storage.region" in str(error.value)


def test_oss_region_builds_aliyun_endpoint_with_virtual_addressing():
    loc = Location("oss://bucket/p", StorageOptions(region="cn-hangzhou"))
    options = fs_options(loc.fs)
    assert options["endpoint_override"] == "oss-cn-hangzhou.aliyuncs.com"
    assert options["scheme"] == "https"
    assert options["region"] == "cn-hangzhou"
    assert options["force_virtual_addressing"] is True


def test_oss_explicit_endpoint_wins_over_region():
    options = fs_options(s3_filesystem(
        "oss", StorageOptions(endpoint="oss-cn-beijing-internal.aliyuncs.com", region="cn-beijing")
    ))
    assert options["endpoint_override"] == "oss-cn-beijing-internal.aliyuncs.com"
    assert options["force_virtual_addressing"] is True


# ---- credentials ------------------------------------------------------------------------------


def test_named_env_vars_supply_the_key_pair_and_token(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)
    monkeypatch.setenv("TEST_TOKEN", SENTINEL_TOKEN)
    options = fs_options(s3_filesystem("s3", keyed(session_token_env="TEST_TOKEN")))
    assert options["access_key"] == SENTINEL_KEY_ID
    assert options["secret_key"] == SENTINEL_SECRET
    assert options["session_token"] == SENTINEL_TOKEN


def test_unset_key_id_env_var_is_named_and_no_secret_leaks(monkeypatch):
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)  # TEST_KEY_ID stays unset
    with pytest.raises(StorageError) as error:
        _ = Location("s3://bucket/p", keyed()).fs
    message = str(error.value)
    assert "TEST_KEY_ID" in message
    assert "access_key_id_env" in message
    assert SENTINEL_SECRET not in message


def test_unset_secret_env_var_is_named_and_no_key_leaks(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", "")  # empty counts as unset
    with pytest.raises(StorageError) as error:
        _ = Location("s3://bucket/p", keyed()).fs
    message = str(error.value)
    assert "TEST_SECRET" in message
    assert "secret_access_key_env" in message
    assert SENTINEL_KEY_ID not in message


def test_unset_session_token_env_var_is_named(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)
    with pytest.raises(StorageError, match="TEST_TOKEN") as error:
        s3_filesystem("s3", keyed(session_token_env="TEST_TOKEN"))
    assert SENTINEL_SECRET not in str(error.value)


def test_key_id_env_without_secret_env_is_a_storage_error(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    with pytest.raises(StorageError, match="go together"):
        s3_filesystem("s3", StorageOptions(access_key_id_env="TEST_KEY_ID"))


def test_anonymous_sends_no_keys(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)
    options = fs_options(s3_filesystem("s3", keyed(anonymous=True)))
    assert options["anonymous"] is True
    assert not options["access_key"]
    assert not options["secret_key"]


def test_oss_falls_back_to_oss_key_env_vars(monkeypatch):
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SENTINEL_SECRET)
    options = fs_options(s3_filesystem("oss", StorageOptions(region="cn-hangzhou")))
    assert options["access_key"] == SENTINEL_KEY_ID
    assert options["secret_key"] == SENTINEL_SECRET
    # s3:// does not read the OSS variables
    assert not fs_options(s3_filesystem("s3", StorageOptions()))["access_key"]


@pytest.mark.parametrize(
    ("uri", "options"),
    [
        ("s3://bucket/p", keyed(session_token_env="TEST_TOKEN", endpoint="http://h:1")),
        ("oss://bucket/p", StorageOptions(region="cn-hangzhou")),  # OSS_ACCESS_KEY_* fallback
    ],
)
def test_location_pickles_without_filesystem_or_secret(monkeypatch, uri, options):
    for name in ("TEST_KEY_ID", "OSS_ACCESS_KEY_ID"):
        monkeypatch.setenv(name, SENTINEL_KEY_ID)
    for name in ("TEST_SECRET", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.setenv(name, SENTINEL_SECRET)
    monkeypatch.setenv("TEST_TOKEN", SENTINEL_TOKEN)
    loc = Location(uri, options)
    fs = loc.fs
    assert fs_options(fs)["secret_key"] == SENTINEL_SECRET  # the filesystem does hold it
    data = pickle.dumps(loc)
    for sentinel in (SENTINEL_SECRET, SENTINEL_TOKEN, SENTINEL_KEY_ID):
        assert sentinel.encode() not in data
    assert b"S3FileSystem" not in data
    copy = pickle.loads(data)
    assert copy == loc
    assert "fs" not in vars(copy)  # rebuilt from the environment where it is used
    assert fs_options(copy.fs)["secret_key"] == SENTINEL_SECRET


def test_local_location_pickles_and_rebuilds_fs(tmp_path):
    loc = Location(str(tmp_path))
    _ = loc.fs
    copy = pickle.loads(pickle.dumps(loc))
    assert copy == loc
    assert copy.path == loc.path
    assert isinstance(copy.fs, pafs.LocalFileSystem)


# ---- error messages ---------------------------------------------------------------------------
# The OSError texts below are verbatim what pyarrow 26 raised against the local S3 server of
# tests/test_s3.py (request ids shortened).

ACCESS_DENIED = (
    "When getting information for key 'p' in bucket 'b': AWS Error ACCESS_DENIED during "
    "HeadObject operation: No response body."
)
SIGNATURE_MISMATCH = (
    "When listing objects under key 'p/' in bucket 'b': AWS Error SIGNATURE_DOES_NOT_MATCH "
    "during ListObjectsV2 operation: The request signature we calculated does not match the "
    "signature you provided. Check your key and signing method. (Request ID: 6nQv)"
)
INVALID_KEY_ID = (
    "When listing objects under key 'p/' in bucket 'b': AWS Error INVALID_ACCESS_KEY_ID during "
    "ListObjectsV2 operation: The AWS Access Key Id you provided does not exist in our records. "
    "(Request ID: lzuh)"
)
NO_SUCH_BUCKET = (
    "When listing objects under key 'p/' in bucket 'b': AWS Error NO_SUCH_BUCKET during "
    "ListObjectsV2 operation: The specified bucket does not exist (Request ID: LzrM)"
)


@pytest.mark.parametrize("text", [ACCESS_DENIED, SIGNATURE_MISMATCH, INVALID_KEY_ID])
def test_auth_failures_get_the_credentials_hint(text):
    message = str(describe_os_error(Location("s3://b/p"), "list", OSError(text)))
    assert message.startswith("Cannot list s3://b/p: When ")
    assert "Check the credentials" in message


def test_missing_bucket_gets_the_bucket_hint():
    message = str(describe_os_error(Location("s3://b/p"), "list", OSError(NO_SUCH_BUCKET)))
    assert "The bucket does not exist." in message


@pytest.mark.parametrize("text", [ACCESS_DENIED, "disk full.", "disk full"])
def test_error_sentence_ends_with_one_period(text):
    message = str(describe_os_error(Location("/tmp/x"), "write to", OSError(text)))
    assert ".." not in message
    assert message.endswith(".")


def test_error_without_text_names_its_type():
    message = str(describe_os_error(Location("s3://b/p"), "list", TimeoutError()))
    assert message == "Cannot list s3://b/p: TimeoutError."


# ---- StorageOptions in a job spec -------------------------------------------------------------


def job(storage: dict) -> dict:
    return {
        "input": {"uri": "s3://bucket/in", "storage": storage},
        "output": {"uri": "/tmp/out"},
    }


def test_job_storage_takes_env_var_names():
    spec = parse_job(job({"access_key_id_env": "MY_KEY_ID", "secret_access_key_env": "MY_SECRET",
                          "endpoint": "http://127.0.0.1:9000", "addressing": "path"}))
    assert spec.input.storage == StorageOptions(
        access_key_id_env="MY_KEY_ID", secret_access_key_env="MY_SECRET",
        endpoint="http://127.0.0.1:9000", addressing="path",
    )


@pytest.mark.parametrize(
    "field", ["access_key_id_env", "secret_access_key_env", "session_token_env"]
)
def test_job_rejects_a_secret_where_an_env_var_name_belongs(field):
    secret = "abc/def+ghi"
    with pytest.raises(JobSpecError) as error:
        parse_job(job({field: secret}))
    message = str(error.value)
    assert f"input.storage.{field}" in message
    assert "environment variable" in message
    assert secret not in message  # the rejected value is not echoed


def test_job_rejects_a_literal_secret_key_field():
    with pytest.raises(JobSpecError, match="secrets belong in env vars") as error:
        parse_job(job({"secret_access_key": "abc/def+ghi"}))
    assert "abc/def+ghi" not in str(error.value)


def test_a_scheme_without_a_registered_filesystem_is_named_with_the_known_ones():
    with pytest.raises(StorageError, match=r"unsupported scheme gs:// \(use a local path or "
                                           r"oss://, s3://\)"):
        _ = location("gs://bucket/data", None).fs
    assert isinstance(location("/tmp/x", None).fs, pafs.LocalFileSystem)


# ---- retry settings ---------------------------------------------------------------------------


def test_retry_settings_have_defaults_and_reach_pyarrow():
    connection = s3_connection("s3", StorageOptions())
    assert (connection.max_attempts, connection.retry_mode) == (10, "standard")
    assert (connection.connect_timeout_s, connection.request_timeout_s) == (10.0, 30.0)
    options = fs_options(s3_filesystem("s3", StorageOptions(connect_timeout_s=2.5,
                                                            request_timeout_s=7)))
    assert (options["connect_timeout"], options["request_timeout"]) == (2.5, 7.0)
    with pytest.raises(ValueError, match="retry_mode"):
        StorageOptions(retry_mode="adaptive")
    with pytest.raises(ValueError, match="max_attempts"):
        StorageOptions(max_attempts=0)


def test_retry_settings_stay_out_of_the_job_digest():
    plain = parse_job(job({"endpoint": "http://127.0.0.1:9000"}))
    patient = parse_job(job({"endpoint": "http://127.0.0.1:9000", "max_attempts": 25,
                             "retry_mode": "legacy", "request_timeout_s": 90}))
    assert patient.input.storage.max_attempts == 25
    assert spec_digest(plain) == spec_digest(patient)
    # the endpoint is part of what the job reads, so it does change the digest
    other = parse_job(job({"endpoint": "http://127.0.0.1:9001"}))
    assert spec_digest(other) != spec_digest(plain)


def test_connection_keeps_keys_out_of_its_repr(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)
    connection = s3_connection("s3", keyed(endpoint="minio:9000"))
    assert connection.secret_key == SENTINEL_SECRET
    assert connection.endpoint_url == "https://minio:9000"
    assert SENTINEL_SECRET not in repr(connection) and SENTINEL_KEY_ID not in repr(connection)


def test_boto3_client_has_the_same_endpoint_keys_and_retry_settings(monkeypatch):
    monkeypatch.setenv("TEST_KEY_ID", SENTINEL_KEY_ID)
    monkeypatch.setenv("TEST_SECRET", SENTINEL_SECRET)
    client = boto3_client("oss", keyed(region="cn-hangzhou", max_attempts=4,
                                       retry_mode="legacy", connect_timeout_s=3,
                                       request_timeout_s=8))
    config = client.meta.config
    assert client.meta.endpoint_url == "https://oss-cn-hangzhou.aliyuncs.com"
    assert client.meta.region_name == "cn-hangzhou"
    assert config.retries == {"total_max_attempts": 4, "mode": "legacy"}
    assert (config.connect_timeout, config.read_timeout) == (3, 8)
    assert config.s3 == {"addressing_style": "virtual"}
    assert client._request_signer._credentials.secret_key == SENTINEL_SECRET


# ---- against the local S3 server --------------------------------------------------------------


def local_options(local_s3, **overrides) -> StorageOptions:
    return StorageOptions(**{
        "endpoint": local_s3.endpoint, "region": "us-east-1", "addressing": "path",
        "access_key_id_env": local_s3.key_id_env, "secret_access_key_env": local_s3.secret_env,
        **overrides})


@pytest.mark.parametrize("addressing", ["path", "virtual"])
def test_boto3_client_writes_conditionally_and_reads_back(local_s3, addressing):
    endpoint = f"http://{'localhost' if addressing == 'virtual' else '127.0.0.1'}:{local_s3.port}"
    client = boto3_client("s3", local_options(local_s3, endpoint=endpoint,
                                              addressing=addressing))
    key = f"boto3-{addressing}/lease"
    start = len(local_s3.requests)
    client.put_object(Bucket=local_s3.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError) as error:
        client.put_object(Bucket=local_s3.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=local_s3.bucket, Key=key)["Body"].read() == b"first"
    hosts = {host for host, _ in local_s3.requests[start:]}
    expected = f"{local_s3.bucket}.localhost" if addressing == "virtual" else "127.0.0.1"
    assert hosts == {f"{expected}:{local_s3.port}"}


class FirstReadsFail(ReverseProxy):
    """Answers the first `failures` attempts of every ranged GET with S3's 503 SlowDown."""

    def __init__(self, upstream: str, failures: int) -> None:
        super().__init__(upstream)
        self.failures = failures
        self.tries: dict[tuple[str, str], int] = {}

    def decide(self, request: ProxyRequest) -> Forward | Answer:
        s3 = classify(request)
        if s3.operation != "read":
            return Forward()
        ranged = (s3.object, request.headers.get("range", request.headers.get("Range", "")))
        with self._lock:
            self.tries[ranged] = self.tries.get(ranged, 0) + 1
            tries = self.tries[ranged]
        if tries > self.failures:
            return Forward()
        return Answer(503, error_body("SlowDown", "Please reduce your request rate.", s3.object),
                      {"Content-Type": "application/xml"})


@pytest.fixture(scope="module")
def small_objects(local_s3) -> dict[str, bytes]:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"n": [1, 2, 3]}), sink)
    objects = {"retry/tiny.parquet": sink.getvalue().to_pybytes(),
               "retry/blob.bin": bytes(range(256)) * 40}
    for key, body in objects.items():
        local_s3.client().put_object(Bucket=local_s3.bucket, Key=key, Body=body)
    return objects


def test_small_ranged_reads_are_retried_past_the_sdk(local_s3, small_objects):
    """A 503 whose body is longer than the range asked for: the AWS SDK gives up on it at once
    ("Failed to flush response stream"), our files try again."""
    blob = small_objects["retry/blob.bin"]
    with running(FirstReadsFail(local_s3.endpoint, failures=2)) as proxy:
        # legacy: the SDK's own retries of the larger reads back off in milliseconds
        options = local_options(local_s3, endpoint=proxy.url, retry_mode="legacy")
        loc = location(f"s3://{local_s3.bucket}/retry", options)
        raw = s3_connection("s3", options)
        with pytest.raises(OSError, match="Failed to flush response stream"):
            pyarrow_s3(raw).open_input_file(loc.join("blob.bin").path).read_at(8, 1000)
        with loc.fs.open_input_file(loc.join("blob.bin").path) as handle:
            assert handle.read_at(8, 2000) == blob[2000:2008]
        table = pq.read_table(loc.join("tiny.parquet").path, filesystem=loc.fs)
        assert table["n"].to_pylist() == [1, 2, 3]
        with loc.fs.open_input_stream(loc.join("blob.bin").path) as stream:
            assert stream.read() == blob


def test_a_read_failing_for_good_is_an_object_read_error_naming_it(local_s3, small_objects):
    with running(FirstReadsFail(local_s3.endpoint, failures=1000)) as proxy:
        loc = location(f"s3://{local_s3.bucket}/retry/blob.bin",
                       local_options(local_s3, endpoint=proxy.url, max_attempts=3))
        with pytest.raises(ObjectReadError) as error:
            loc.fs.open_input_file(loc.path).read_at(8, 0)
        assert sum(proxy.tries.values()) == 3
    message = str(error.value)
    assert message.startswith(f"Cannot read s3://{local_s3.bucket}/retry/blob.bin: ")
    assert "after 3 tries" in message and "storage.max_attempts" in message
    assert local_s3.secret_access_key not in message
