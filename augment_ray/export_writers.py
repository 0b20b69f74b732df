"""Where `augment-ray export` writes: a JSONL file, or a Hugging Face `datasets` folder.

Both write next to the target first and rename into place at the end, so a failed export leaves
nothing half-written, and both refuse an existing target unless `force`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from augment_ray.errors import AugmentRayError, StorageError

# how far into a JSONL file the line that types a column may come (see write_jsonl); Hugging Face
# `datasets` reads JSON in 10 MB blocks and takes the columns' types from the first
FRONT_BYTES = 1 << 20
COPY_BYTES = 1 << 20
# files a save_to_disk folder holds: --force replaces only a folder with one of them
HF_MARKERS = ("dataset_info.json", "state.json")


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"Cannot create {path.parent}: {error}.") from None


def _move_line_to_front(path: Path, offset: int, length: int) -> None:
    """Rewrite `path` with the line at byte `offset` first (streamed, memory stays flat)."""
    moved = path.with_name(path.name + ".front")
    try:
        with path.open("rb") as source, moved.open("wb") as target:
            source.seek(offset)
            target.write(source.read(length))
            source.seek(0)
            remaining = offset
            while remaining:
                chunk = source.read(min(COPY_BYTES, remaining))
                target.write(chunk)
                remaining -= len(chunk)
            source.seek(offset + length)
            shutil.copyfileobj(source, target, COPY_BYTES)
        os.replace(moved, path)
    finally:
        moved.unlink(missing_ok=True)


def write_jsonl(records: Iterator[dict[str, Any]], path: Path, force: bool,
                types_columns: Callable[[dict[str, Any]], bool] | None = None) -> int:
    """Write `records` as JSON lines to `path` (parents created); refuses an existing file
    unless `force`. A JSONL reader that takes the column types from the file's first block
    (`datasets`) fails on a later line with a type that block lacks (a non-empty alpaca
    `history` after only empty ones), so the first record `types_columns` accepts is moved to
    the front when it came later than FRONT_BYTES."""
    path = Path(os.path.abspath(path))  # "." has no name to put the partial file beside
    if path.is_dir():
        raise StorageError(f"{path} is a directory; --to names the JSONL file to write.")
    if path.exists() and not force:
        raise StorageError(f"{path} already exists; pass --force to overwrite it.")
    _mkdir_parent(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    count = offset = 0
    typing_line: tuple[int, int] | None = None
    try:
        with partial.open("wb") as handle:
            for record in records:
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                if typing_line is None and types_columns is not None and types_columns(record):
                    typing_line = (offset, len(line))
                handle.write(line)
                offset += len(line)
                count += 1
        if typing_line is not None and typing_line[0] >= FRONT_BYTES:
            _move_line_to_front(partial, *typing_line)
        os.replace(partial, path)
    except OSError as error:
        raise StorageError(f"Cannot write {path}: {error}.") from None
    finally:
        partial.unlink(missing_ok=True)
    return count


def _check_folder_target(path: Path, force: bool) -> None:
    """An existing `path` is replaced only with `force`, and only when it is empty or a
    `datasets` folder: --force never deletes a folder of something else."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StorageError(f"{path} is a file; --format hf writes a folder (pass a new path).")
    if not force:
        raise StorageError(f"{path} already exists; pass --force to replace it.")
    if any(path.iterdir()) and not any((path / name).exists() for name in HF_MARKERS):
        raise StorageError(f"{path} is not empty and holds no saved dataset "
                           f"({' or '.join(HF_MARKERS)}); --force replaces only a dataset "
                           "folder. Pass a new path.")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or INFO lines from `datasets` on the command's output."""
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _cause(error: BaseException) -> AugmentRayError | None:
    """Our own error inside one `datasets` wrapped (a shard that cannot be read)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AugmentRayError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_hf_folder(records: Iterator[dict[str, Any]], path: Path, force: bool) -> int:
    """Write `records` ({"messages": [{role, content}, ...]}) as a `datasets` folder at `path`
    (Dataset.save_to_disk; datasets.load_from_disk reads it). Examples stream through
    Dataset.from_generator into an Arrow file in a staging folder beside `path` (memory stays
    flat), which save_to_disk then writes out; the result is renamed into place and the
    staging folder removed, whatever happens."""
    import datasets

    path = Path(os.path.abspath(path))
    _check_folder_target(path, force)
    _mkdir_parent(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    features = datasets.Features({"messages": datasets.List(
        {"role": datasets.Value("string"), "content": datasets.Value("string")})})
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with _quiet_datasets():
            first = next(records, None)
            if first is None:  # from_generator refuses an empty split
                dataset = datasets.Dataset.from_dict({"messages": []}, features=features)
            else:
                examples = itertools.chain([first], records)
                # the cache is the fresh staging folder: a fixed fingerprint spares hashing
                dataset = datasets.Dataset.from_generator(
                    lambda: examples, features=features, cache_dir=str(staging / "cache"),
                    fingerprint="augment-ray-export")
            count = dataset.num_rows
            # num_shards: an empty dataset saved with the default 0 shards does not load back
            dataset.save_to_disk(str(staging / "dataset"),
                                 num_shards=None if count else 1)
            del dataset  # its Arrow file is memory-mapped from staging
        if path.exists():  # _check_folder_target allowed replacing it
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            try:
                os.replace(staging / "dataset", path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging / "dataset", path)
    except AugmentRayError:
        raise
    except Exception as error:
        ours = _cause(error)
        if ours is not None:
            raise ours from None
        if isinstance(error, OSError):
            raise StorageError(f"Cannot write {path}: {error}.") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count
