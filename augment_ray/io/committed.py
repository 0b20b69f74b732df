"""What marks a committed run, and the one reader of the JSON files a run writes, for everything
that reads one. No Ray here: `augment-ray export` and `report` import this without paying for
Ray's start-up."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from augment_ray.errors import StorageError
from augment_ray.storage import Location, describe_os_error, redact_uri

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"  # written last by a run's commit
STARTED = "_STARTED"  # written when a run starts: which job the output's partial files are from


def spec_json(job: Any, leave_out: Collection[str] = ()) -> bytes:
    """What a job (a pydantic spec) computes, as canonical JSON: output.mode (how to treat an
    existing output) is left out, so a --force rerun is still the same job, and so are the
    top-level fields `leave_out` names."""
    data = job.model_dump(mode="json", exclude=set(leave_out))
    data.get("output", {}).pop("mode", None)
    return json.dumps(data, sort_keys=True).encode()


def spec_digest(job: Any, leave_out: Collection[str] = ()) -> str:
    """The job digest a rerun compares: the first 16 hex digits of SHA-256 over spec_json."""
    return hashlib.sha256(spec_json(job, leave_out)).hexdigest()[:16]


def read_json(loc: Location, name: str) -> dict[str, Any]:
    """The JSON object `name` under `loc`. A file that is missing, cannot be read, is not JSON
    or holds no object is a StorageError that names it (credentials in the URI redacted)."""
    target = loc.join(name)
    try:
        with target.fs.open_input_stream(target.path) as stream:
            payload = json.loads(stream.read())
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(target, "read", error) from None
    except ValueError as error:  # not JSON, not UTF-8
        raise StorageError(f"Cannot read {redact_uri(target.uri)}: {error}.") from None
    if not isinstance(payload, dict):
        raise StorageError(f"Cannot read {redact_uri(target.uri)}: not a JSON object.")
    return payload


def probe_json(loc: Location, name: str) -> dict[str, Any] | None:
    """read_json, or None when the file is missing or unusable: for the checks of what an
    output already holds, which then count it as not started or not committed."""
    try:
        return read_json(loc, name)
    except StorageError:
        return None


def has_marker(loc: Location, name: str) -> bool:
    """Whether the file `name` (a marker: _SUCCESS, a loop round's _DONE) is under `loc`."""
    marker = loc.join(name)
    try:
        return marker.file_info().type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(marker, "read", error) from None


def require_committed(output: Location, reader: str) -> None:
    """A clear StorageError unless `output` holds a committed run (its _SUCCESS): readers of a
    run (export, report) never read an unfinished one, whose shards may still move."""
    if not has_marker(output, SUCCESS):
        raise StorageError(
            f"{redact_uri(output.uri)} is not a finished run (no {SUCCESS}): {reader} reads only "
            "committed outputs; wait for the run to finish (or rerun it to resume it), then try "
            "again."
        )


def committed_files(output: Location, manifest: dict[str, Any], key: str,
                    optional: bool = False) -> list[Location]:
    """The shards a committed run's manifest lists under `key` (files: data/, reject_files:
    _rejects/); a manifest without such a list is a clear StorageError (an `optional` key that
    is absent lists none)."""
    names = manifest.get(key, [] if optional else None)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise StorageError(
            f"{redact_uri(output.join(MANIFEST).uri)} has no {key!r} list of shard paths.")
    return [output.join(name) for name in names]


def started_by(output: Location) -> str | None:
    """The job digest of the run that started writing at `output`, if one did."""
    return (probe_json(output, STARTED) or {}).get("job_digest")


def committed_run(output: Location) -> dict[str, Any] | None:
    """{manifest, summary} of the run committed at `output` (it has _SUCCESS), else None."""
    if probe_json(output, SUCCESS) is None:
        return None
    manifest, summary = probe_json(output, MANIFEST), probe_json(output, SUMMARY)
    if manifest is None or summary is None:
        return None
    return {"manifest": manifest, "summary": summary}
