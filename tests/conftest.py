"""Shared pytest fixtures."""

from __future__ import annotations

# ==== local_s3: a real S3-compatible server (moto), for tests/test_s3.py and others ============
# Self-contained: everything this block needs is imported or defined inside it. moto and boto3
# are imported only when the fixture is used, so tests that never touch S3 do not pay for them.
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class LocalS3:
    """A running moto server with IAM authentication on: requests must be signed with the key
    pair below (a wrong secret is refused with SignatureDoesNotMatch, as on real S3)."""

    port: int
    bucket: str
    access_key_id: str
    secret_access_key: str
    # the env vars holding the key pair, for StorageOptions.access_key_id_env / _env
    key_id_env: str = "AUGMENT_RAY_TEST_S3_KEY_ID"
    secret_env: str = "AUGMENT_RAY_TEST_S3_SECRET"
    # (Host header, path) of every HTTP request the server received, oldest first
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )


@pytest.fixture(scope="module")
def local_s3() -> Iterator[LocalS3]:
    """Start moto on 127.0.0.1 (a free port), create an IAM user allowed s3:* and one bucket,
    then turn IAM authentication on. Environment: dummy AWS_* credentials (so nothing falls
    back to a real account or to instance metadata) and the user's keys in LocalS3.key_id_env
    and LocalS3.secret_env. Everything is undone at module end."""
    import boto3
    from moto.core import enable_iam_authentication
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    seen: list[tuple[str, str]] = []
    server_url = ""
    try:
        _, port = server.get_host_and_port()
        server_url = f"http://127.0.0.1:{port}"
        wsgi_server = server._server  # werkzeug server: each request calls .app
        inner_app = wsgi_server.app

        def recording_app(environ, start_response):
            seen.append((environ.get("HTTP_HOST", ""), environ.get("PATH_INFO", "")))
            return inner_app(environ, start_response)

        wsgi_server.app = recording_app
        with pytest.MonkeyPatch.context() as env:
            for name, value in {
                "AWS_ACCESS_KEY_ID": "dummy-not-a-real-key",
                "AWS_SECRET_ACCESS_KEY": "dummy-not-a-real-secret",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }.items():
                env.setenv(name, value)
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
                env.delenv(name, raising=False)

            endpoint = server_url
            iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
            iam.create_user(UserName="augment-ray-test")
            iam.put_user_policy(
                UserName="augment-ray-test",
                PolicyName="s3-all",
                PolicyDocument=json.dumps({
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }),
            )
            key = iam.create_access_key(UserName="augment-ray-test")["AccessKey"]
            s3 = LocalS3(
                port=port,
                bucket="augment-test",
                access_key_id=key["AccessKeyId"],
                secret_access_key=key["SecretAccessKey"],
                requests=seen,
            )
            env.setenv(s3.key_id_env, s3.access_key_id)
            env.setenv(s3.secret_env, s3.secret_access_key)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket=s3.bucket
            )
            with enable_iam_authentication():
                yield s3
    finally:
        # moto's backends are process-wide: drop the user and bucket so that another module's
        # local_s3 starts clean
        with contextlib.suppress(OSError, ValueError):
            urllib.request.urlopen(
                urllib.request.Request(f"{server_url}/moto-api/reset", method="POST"), timeout=10
            ).close()
        server.stop()


# ==== end local_s3 ==============================================================================


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private 2-CPU Ray for one test module (like the CI machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
