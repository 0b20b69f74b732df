"""What marks a committed run, for everything that reads one. No Ray here: `augment-ray export`
and `report` import this without paying for Ray's start-up."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from augment_ray.errors import StorageError
from augment_ray.storage import Location, describe_os_error, redact_uri

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
SUCCESS = "_SUCCESS"  # written last by a run's commit


def require_committed(output: Location, reader: str) -> None:
    """A clear StorageError unless `output` holds a committed run (its _SUCCESS): readers of a
    run (export, report) never read an unfinished one, whose shards may still move."""
    marker = output.join(SUCCESS)
    try:
        missing = marker.file_info().type == pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(marker, "read", error) from None
    if missing:
        raise StorageError(
            f"{redact_uri(output.uri)} is not a finished run (no {SUCCESS}): {reader} reads only "
            "committed outputs; wait for the run to finish (or rerun it to resume it), then try "
            "again."
        )
