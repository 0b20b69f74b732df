"""URI -> pyarrow filesystem: local paths, s3:// and oss:// (S3-compatible, virtual-hosted).

A `Location` pickles as its URI and options only; the filesystem, and with it any credential,
is built where it is used (driver or Ray worker) from the environment, so no secret travels in
task arguments, logs or manifests.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pyarrow.fs as pafs

from augment_ray.config.base import StorageOptions
from augment_ray.errors import StorageError
from augment_ray.names import CONVENTIONAL_ENV_VAR_NAME
from augment_ray.retrying_reads import retrying_reads

OSS_KEY_ENV = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")


def redact_uri(uri: str) -> str:
    """Drop any user:password@ part of a URI before it is printed or stored."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        host = parsed.hostname or ""
        if parsed.port:
            host += f":{parsed.port}"
        return urlunparse(parsed._replace(netloc=f"***@{host}"))
    return uri


def _env(name: str, field_name: str) -> str:
    value = os.environ.get(name)
    if not value:
        # a name with lower-case letters in it may be a secret (an AWS or OSS key secret is
        # mixed-case) pasted where the NAME belongs
        if CONVENTIONAL_ENV_VAR_NAME.match(name):
            raise StorageError(
                f"Environment variable {name} (named by storage.{field_name}) is not set."
            )
        # never echo it: it may be the secret itself, pasted where its variable's NAME belongs
        raise StorageError(
            f"The environment variable named by storage.{field_name} is not set (its name is "
            "not shown: it has lower-case letters, like a secret value; storage.*_env takes "
            "the NAME of a variable, e.g. AWS_SECRET_ACCESS_KEY)."
        )
    return value


FileSystemFactory = Callable[[str, StorageOptions], pafs.FileSystem]
# URI scheme -> the function that builds its filesystem; a new scheme is one decorated function
FILESYSTEMS: dict[str, FileSystemFactory] = {}


def filesystem(*schemes: str) -> Callable[[FileSystemFactory], FileSystemFactory]:
    """Registers a factory(scheme, options) -> pyarrow filesystem for URIs of `schemes`."""
    def register(factory: FileSystemFactory) -> FileSystemFactory:
        for scheme in schemes:
            FILESYSTEMS[scheme] = factory
        return factory

    return register


@filesystem("file")
def local_filesystem(scheme: str, options: StorageOptions) -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@dataclass(frozen=True)
class S3Connection:
    """Where and how to reach an S3-compatible store, resolved once from StorageOptions and the
    environment, for both clients: pyarrow's S3FileSystem and boto3's (the output lease)."""

    endpoint_url: str | None  # scheme://host[:port]; None: the AWS endpoint of the region
    region: str | None
    virtual_addressing: bool
    anonymous: bool
    max_attempts: int
    retry_mode: str  # "standard" | "legacy"
    connect_timeout_s: float
    request_timeout_s: float
    # None with anonymous False: the AWS SDK's default chain (env vars, AWS_PROFILE, roles)
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def s3_connection(scheme: str, options: StorageOptions) -> S3Connection:
    """The endpoint, addressing, credentials and retry settings for an s3:// or oss:// URI."""
    endpoint = options.endpoint
    if scheme == "oss" and endpoint is None:
        if options.region is None:
            raise StorageError(
                "oss:// needs storage.endpoint (e.g. oss-cn-hangzhou.aliyuncs.com) or "
                "storage.region (e.g. cn-hangzhou)."
            )
        endpoint = f"oss-{options.region}.aliyuncs.com"
    endpoint_url = None
    if endpoint is not None:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"storage.endpoint {endpoint!r} is not a host or http(s) URL.")
        endpoint_url = f"{parsed.scheme}://{parsed.netloc}"
    addressing = options.addressing
    if addressing == "auto":
        addressing = "virtual" if scheme == "oss" else "path"
    return S3Connection(
        endpoint_url=endpoint_url, region=options.region,
        virtual_addressing=addressing == "virtual", anonymous=options.anonymous,
        max_attempts=options.max_attempts, retry_mode=options.retry_mode,
        connect_timeout_s=options.connect_timeout_s,
        request_timeout_s=options.request_timeout_s,
        **({} if options.anonymous else _credentials(scheme, options)),
    )


def _credentials(scheme: str, options: StorageOptions) -> dict[str, str]:
    """access_key, secret_key (and session_token) from the env vars the options name; for
    oss:// the OSS_ACCESS_KEY_* pair; empty for the AWS SDK's default chain."""
    if options.access_key_id_env or options.secret_access_key_env:
        if not (options.access_key_id_env and options.secret_access_key_env):
            raise StorageError(
                "storage.access_key_id_env and storage.secret_access_key_env go together."
            )
        keys = {"access_key": _env(options.access_key_id_env, "access_key_id_env"),
                "secret_key": _env(options.secret_access_key_env, "secret_access_key_env")}
        if options.session_token_env:
            keys["session_token"] = _env(options.session_token_env, "session_token_env")
        return keys
    if scheme == "oss" and all(os.environ.get(name) for name in OSS_KEY_ENV):
        return {"access_key": os.environ[OSS_KEY_ENV[0]],
                "secret_key": os.environ[OSS_KEY_ENV[1]]}
    return {}


def pyarrow_s3(connection: S3Connection) -> pafs.S3FileSystem:
    """pyarrow's own S3 filesystem for `connection` (no read retries added)."""
    strategy = (pafs.AwsStandardS3RetryStrategy if connection.retry_mode == "standard"
                else pafs.AwsDefaultS3RetryStrategy)
    kwargs: dict = {
        "force_virtual_addressing": connection.virtual_addressing,
        "retry_strategy": strategy(max_attempts=connection.max_attempts),
        "connect_timeout": connection.connect_timeout_s,
        # the AWS SDK's curl client aborts a request that receives nothing for this long
        "request_timeout": connection.request_timeout_s,
    }
    if connection.endpoint_url is not None:
        parsed = urlparse(connection.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if connection.region is not None:
        kwargs["region"] = connection.region
    if connection.anonymous:
        kwargs["anonymous"] = True
    elif connection.access_key is not None:
        kwargs["access_key"] = connection.access_key
        kwargs["secret_key"] = connection.secret_key
        if connection.session_token is not None:
            kwargs["session_token"] = connection.session_token
    return pafs.S3FileSystem(**kwargs)


@filesystem("s3", "oss")
def s3_filesystem(scheme: str, options: StorageOptions) -> pafs.FileSystem:
    """pyarrow's S3 filesystem whose input files also retry what the AWS SDK does not."""
    connection = s3_connection(scheme, options)
    return retrying_reads(pyarrow_s3(connection), scheme, connection.max_attempts)


def boto3_client(scheme: str, options: StorageOptions):  # -> botocore S3 client
    """A boto3 S3 client for the same store, credentials and retry settings as the pyarrow
    filesystem: for what pyarrow cannot do (conditional writes: the output lease)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    connection = s3_connection(scheme, options)
    config = Config(
        retries={"total_max_attempts": connection.max_attempts, "mode": connection.retry_mode},
        connect_timeout=connection.connect_timeout_s,
        read_timeout=connection.request_timeout_s,
        s3={"addressing_style": "virtual" if connection.virtual_addressing else "path"},
        **({"signature_version": UNSIGNED} if connection.anonymous else {}),
    )
    if connection.virtual_addressing and connection.endpoint_url is not None and \
            urlparse(connection.endpoint_url).hostname == "localhost":
        resolve_localhost_subdomains()
    # a session of its own: boto3's default session is not safe to share between threads
    return boto3.session.Session().client(
        "s3", endpoint_url=connection.endpoint_url, region_name=connection.region,
        aws_access_key_id=connection.access_key, aws_secret_access_key=connection.secret_key,
        aws_session_token=connection.session_token, config=config,
    )


def resolve_localhost_subdomains() -> None:
    """Resolve NAME.localhost to loopback in this process, as RFC 6761 asks and as pyarrow's
    libcurl does by itself: a virtual-hosted request to a local endpoint (http://localhost:PORT,
    MinIO or a test server) goes to BUCKET.localhost, which glibc without nss-myhostname does
    not resolve. Names the system resolves are left to it."""
    if getattr(socket.getaddrinfo, "_localhost_subdomains", False):
        return
    system_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        try:
            return system_getaddrinfo(host, *args, **kwargs)
        except socket.gaierror:
            name = host.decode() if isinstance(host, bytes) else str(host)
            if not name.rstrip(".").endswith(".localhost"):
                raise
            return system_getaddrinfo("localhost", *args, **kwargs)

    getaddrinfo._localhost_subdomains = True  # type: ignore[attr-defined]
    socket.getaddrinfo = getaddrinfo


@dataclass(frozen=True)
class Location:
    """A folder or file named by a URI, plus how to reach it."""

    uri: str
    options: StorageOptions = field(default_factory=StorageOptions)

    @property
    def scheme(self) -> str:
        scheme = urlparse(self.uri).scheme
        # a Windows drive letter or a plain path has no real scheme
        return "file" if len(scheme) <= 1 else scheme

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> str:
        """The path inside the filesystem: an absolute local path, or bucket/key."""
        if self.is_local:
            raw = self.uri.removeprefix("file://")
            return str(Path(raw).expanduser().resolve())
        parsed = urlparse(self.uri)
        if "@" in parsed.netloc:
            raise StorageError(
                f"{redact_uri(self.uri)}: credentials in a URI are not supported (and are not "
                "shown); name the environment variables holding them in "
                "storage.access_key_id_env and storage.secret_access_key_env."
            )
        if not parsed.netloc:
            raise StorageError(f"{self.uri} names no bucket (expected {self.scheme}://BUCKET/...).")
        return f"{parsed.netloc}{parsed.path}".rstrip("/")

    @cached_property
    def fs(self) -> pafs.FileSystem:
        factory = FILESYSTEMS.get(self.scheme)
        if factory is None:
            known = ", ".join(f"{s}://" for s in sorted(FILESYSTEMS) if s != "file")
            raise StorageError(
                f"{self.uri}: unsupported scheme {self.scheme}:// (use a local path or {known})."
            )
        return factory(self.scheme, self.options)

    def join(self, *parts: str) -> Location:
        base = self.uri.rstrip("/")
        return Location("/".join([base, *parts]), self.options)

    def file_info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def __getstate__(self) -> dict:
        # never pickle the filesystem: it holds credentials
        return {"uri": self.uri, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "options", state["options"])


def location(uri: str, options: StorageOptions | None) -> Location:
    loc = Location(uri, options or StorageOptions())
    _ = loc.path  # validate the URI early
    return loc


# AWS SDK error codes of failures a retry may fix (as squashed by describe_os_error)
TRANSIENT_CODES = ("slowdown", "serviceunavailable", "internalerror", "internalfailure",
                   "networkconnection", "requesttimeout", "throttl", "curlcode")


def describe_os_error(loc: Location, action: str, error: Exception,
                      after: str = "") -> StorageError:
    """Turn a pyarrow/OS error into one sentence naming the URI ("Cannot ACTION URI AFTER:
    what went wrong."); drops nothing the user needs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.rstrip(".")
    userinfo = urlparse(loc.uri).netloc.rpartition("@")[0]
    if userinfo:  # pyarrow's text may quote the path, and with it any user:password@
        text = text.replace(userinfo, "***")
    # pyarrow spells AWS error codes ACCESS_DENIED, INVALID_ACCESS_KEY_ID, ...
    squashed = re.sub(r"[\s_]", "", text.lower())
    hint = ""
    if any(code in squashed for code in
           ("accessdenied", "403", "invalidaccesskeyid", "signaturedoesnotmatch")):
        hint = " Check the credentials (env vars named in storage.*_env, or the AWS chain)."
    elif "nosuchbucket" in squashed or "bucketdoesnotexist" in squashed or (
        "bucket" in squashed and "notfound" in squashed
    ):
        hint = " The bucket does not exist."
    elif any(code in squashed for code in TRANSIENT_CODES):
        hint = (" The store kept failing (throttling, server or network errors) through "
                "storage.max_attempts tries, or, with storage.retry_mode standard, until the "
                "AWS SDK's retry quota ran out; try again later, raise storage.max_attempts, or "
                "set storage.retry_mode: legacy (no quota).")
    return StorageError(f"Cannot {action} {redact_uri(loc.uri)}{after}: {text}.{hint}")
