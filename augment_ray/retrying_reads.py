"""An S3 filesystem whose reads retry what the AWS SDK does not.

pyarrow reads an object range into a buffer of exactly the range's size; when S3 answers with
an error (503 SlowDown, 500 InternalError) whose XML body is longer than that range, as it is
for a Parquet footer or a small column chunk, the SDK fails at once with "Failed to flush
response stream" instead of retrying (measured with pyarrow 26 against a proxy answering one
ranged GET of 8-100 bytes with a 200-byte 503: the read failed with no second request; a
300-byte range was retried). `retrying_reads` wraps an S3FileSystem in a PyFileSystem that
delegates everything to it, except that files opened for reading retry those errors with
backoff, up to storage.max_attempts tries, and a read that fails for good is an ObjectReadError
naming the object.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from augment_ray.errors import ObjectReadError

# AWS SDK errors the SDK itself does not retry, though a retry succeeds
UNRETRIED_BY_SDK = ("Failed to flush response stream",)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0


def retrying_reads(fs: pafs.S3FileSystem, scheme: str, max_attempts: int) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(RetryingReadsHandler(fs, scheme, max_attempts))


def backoff_s(attempt: int) -> float:
    """Seconds to wait after the `attempt`-th failed try: doubling, capped, jittered."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class RetryingReadsHandler(pafs.FileSystemHandler):
    """Every call goes to the S3FileSystem; opened input files are RetryingFile."""

    def __init__(self, fs: pafs.S3FileSystem, scheme: str, max_attempts: int) -> None:
        self.fs = fs
        self.scheme = scheme
        self.max_attempts = max_attempts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingReadsHandler) and self.fs.equals(other.fs) and \
            (self.scheme, self.max_attempts) == (other.scheme, other.max_attempts)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"{self.fs.type_name}+retrying-reads"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_file(self, path: str) -> pa.PythonFile:
        uri = f"{self.scheme}://{path}"
        return pa.PythonFile(RetryingFile(self.fs.open_input_file(path), uri,
                                          self.max_attempts), mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        # a random-access file is a stream too, and its reads are the ones retried
        return self.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)


class RetryingFile:
    """A Python file object (for pa.PythonFile) over an S3 input file: every read is a
    positioned read of the native file, retried when the SDK gave up on what a retry fixes."""

    def __init__(self, file: pa.NativeFile, uri: str, max_attempts: int) -> None:
        self._file = file
        self._uri = uri
        self._max_attempts = max_attempts
        self._size = file.size()
        self._position = 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, nbytes: int | None = -1) -> bytes:
        left = max(0, self._size - self._position)
        wanted = left if nbytes is None or nbytes < 0 else min(nbytes, left)
        if not wanted:
            return b""
        data = self._read_at(wanted, self._position)
        self._position += len(data)
        return data

    def _read_at(self, nbytes: int, offset: int) -> bytes:
        for attempt in range(1, self._max_attempts + 1):
            try:
                return self._file.read_at(nbytes, offset)
            except (OSError, pa.ArrowException) as error:
                text = str(error).strip().splitlines()[0] if str(error).strip() else \
                    type(error).__name__
                unretried = any(marker in text for marker in UNRETRIED_BY_SDK)
                if attempt == self._max_attempts or not unretried:
                    raise self._failed(text, attempt, unretried) from None
                time.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    def _failed(self, text: str, attempts: int, unretried: bool) -> ObjectReadError:
        if unretried:
            text = ("the store answered with an error every time (the AWS SDK reports an error "
                    f"answer to a small ranged read as {text.rstrip('.: ')!r})")
        tries = f" (after {attempts} tries)" if attempts > 1 else ""
        return ObjectReadError(
            f"Cannot read {self._uri}: {text.rstrip('.: ')}{tries}. storage.max_attempts sets "
            "how often a request is tried.")

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self.closed = True

    def __enter__(self) -> RetryingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
