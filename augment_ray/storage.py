"""URI -> pyarrow filesystem: local paths, s3:// and oss:// (S3-compatible, virtual-hosted).

A `Location` pickles as its URI and options only; the filesystem, and with it any credential,
is built where it is used (driver or Ray worker) from the environment, so no secret travels in
task arguments, logs or manifests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pyarrow.fs as pafs

from augment_ray.config.base import StorageOptions
from augment_ray.errors import StorageError
from augment_ray.names import CONVENTIONAL_ENV_VAR_NAME

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


@filesystem("s3", "oss")
def s3_filesystem(scheme: str, options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = options.endpoint
    if scheme == "oss" and endpoint is None:
        if options.region is None:
            raise StorageError(
                "oss:// needs storage.endpoint (e.g. oss-cn-hangzhou.aliyuncs.com) or "
                "storage.region (e.g. cn-hangzhou)."
            )
        endpoint = f"oss-{options.region}.aliyuncs.com"
    if endpoint is not None:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"storage.endpoint {endpoint!r} is not a host or http(s) URL.")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if options.region is not None:
        kwargs["region"] = options.region
    addressing = options.addressing
    if addressing == "auto":
        addressing = "virtual" if scheme == "oss" else "path"
    kwargs["force_virtual_addressing"] = addressing == "virtual"

    if options.anonymous:
        kwargs["anonymous"] = True
    elif options.access_key_id_env or options.secret_access_key_env:
        if not (options.access_key_id_env and options.secret_access_key_env):
            raise StorageError(
                "storage.access_key_id_env and storage.secret_access_key_env go together."
            )
        kwargs["access_key"] = _env(options.access_key_id_env, "access_key_id_env")
        kwargs["secret_key"] = _env(options.secret_access_key_env, "secret_access_key_env")
        if options.session_token_env:
            kwargs["session_token"] = _env(options.session_token_env, "session_token_env")
    elif scheme == "oss" and all(os.environ.get(name) for name in OSS_KEY_ENV):
        kwargs["access_key"] = os.environ[OSS_KEY_ENV[0]]
        kwargs["secret_key"] = os.environ[OSS_KEY_ENV[1]]
    # otherwise: the AWS SDK's default chain (env vars, AWS_PROFILE, instance role)
    return pafs.S3FileSystem(**kwargs)


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


def describe_os_error(loc: Location, action: str, error: Exception) -> StorageError:
    """Turn a pyarrow/OS error into one sentence naming the URI; drops nothing the user needs."""
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
    return StorageError(f"Cannot {action} {redact_uri(loc.uri)}: {text}.{hint}")
