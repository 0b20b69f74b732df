"""Where an output's lease lives, with the one atomic operation each store offers: an exclusive
create and a compare-and-swap replace. Local disks: a hard link (atomic, fails if the name
exists) and a short lock file around replace; S3: conditional PUTs (If-None-Match: *, If-Match:
ETag) through boto3, which pyarrow cannot send; OSS: x-oss-forbid-overwrite on create."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from augment_ray.storage import Location

LEASE = "_LEASE"
LOCK_STALE_S = 30.0  # a lock file older than this was left by a process that died holding it


@dataclass(frozen=True)
class Stored:
    data: bytes
    token: str  # what replace() and delete() must be given: the version this reader saw


class LeaseStore(Protocol):
    def create(self, data: bytes) -> str | None:
        """Write the lease if none exists: its token, or None when one exists."""

    def read(self) -> Stored | None:
        """The lease and its token, or None when there is none."""

    def replace(self, data: bytes, token: str) -> str | None:
        """Overwrite the lease if it is still at `token`: the new token, or None."""

    def delete(self, token: str) -> None:
        """Remove the lease if it is still at `token`."""


def lease_store(output: Location) -> LeaseStore:
    if output.is_local:
        return LocalLeaseStore(os.path.join(output.path, LEASE))
    return S3LeaseStore(output)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalLeaseStore:
    """A file on a local (or shared POSIX) disk; its token is its content's hash."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = f"{path}.lock"

    def _staged(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        staged = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(staged, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return staged

    def create(self, data: bytes) -> str | None:
        staged = self._staged(data)
        try:
            os.link(staged, self.path)  # atomic: fails when the lease exists, never half-written
        except FileExistsError:
            return None
        finally:
            os.unlink(staged)
        return _digest(data)

    def read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return Stored(data, _digest(data))

    @contextlib.contextmanager
    def _locked(self) -> Any:
        deadline = time.monotonic() + LOCK_STALE_S
        while True:
            try:
                os.close(os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.stat(self.lock).st_mtime > LOCK_STALE_S:
                        os.unlink(self.lock)
                        continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.lock} stayed locked for {LOCK_STALE_S:g}s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock)

    def replace(self, data: bytes, token: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current.token != token:
                return None
            os.replace(self._staged(data), self.path)
            return _digest(data)

    def delete(self, token: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current.token == token:
                os.unlink(self.path)


# S3 answers a failed condition with 412 PreconditionFailed, or 409 when another conditional
# write of the same key is in flight
CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409",
                    "FileAlreadyExists"}
READ_BACK_S = 0.5  # OSS replaces without If-Match: read back after a pause to see who won


class S3LeaseStore:
    """An object next to the output's files; its token is the ETag S3 returned."""

    def __init__(self, output: Location) -> None:
        from augment_ray.storage import boto3_client

        bucket, _, prefix = output.path.partition("/")
        self.bucket, self.key = bucket, f"{prefix}/{LEASE}".lstrip("/")
        self.oss = output.scheme == "oss"
        self.client = boto3_client(output.scheme, output.options)

    def _failed_condition(self, error: Exception) -> bool:
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        return code in CONDITION_FAILED

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                            **condition)
        except ClientError as error:
            if self._failed_condition(error):
                return None
            raise
        return str(answer["ETag"])

    def create(self, data: bytes) -> str | None:
        if self.oss:  # OSS has no If-None-Match on PUT; it refuses an overwrite by this header
            return self._put_oss(data, forbid_overwrite=True)
        return self._put(data, IfNoneMatch="*")

    def _put_oss(self, data: bytes, forbid_overwrite: bool) -> str | None:
        def add_header(request: Any, **_: Any) -> None:
            request.headers["x-oss-forbid-overwrite"] = "true"

        events = self.client.meta.events
        if forbid_overwrite:
            events.register("before-sign.s3.PutObject", add_header)
        try:
            token = self._put(data)
        finally:
            if forbid_overwrite:
                events.unregister("before-sign.s3.PutObject", add_header)
        return token

    def read(self) -> Stored | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise
        return Stored(answer["Body"].read(), str(answer["ETag"]))

    def replace(self, data: bytes, token: str) -> str | None:
        if not self.oss:
            return self._put(data, IfMatch=token)
        current = self.read()
        if current is None or current.token != token:
            return None
        self._put_oss(data, forbid_overwrite=False)
        time.sleep(READ_BACK_S)
        after = self.read()
        return after.token if after is not None and after.data == data else None

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current.token == token:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
