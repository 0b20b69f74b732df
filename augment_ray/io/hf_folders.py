"""Hugging Face `datasets` folders as input, read with pyarrow alone (so from any storage
filesystem, local, S3 or OSS, without the `datasets` library).

`Dataset.save_to_disk` writes data-XXXXX-of-YYYYY.arrow files (Arrow IPC stream format) beside
state.json (which lists them in `_data_files`) and dataset_info.json; `DatasetDict.save_to_disk`
writes dataset_dict.json ({"splits": [...]}) and one such folder per split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from augment_ray.errors import InputDataError
from augment_ray.storage import Location, describe_os_error

STATE = "state.json"
DATASET_DICT = "dataset_dict.json"


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _exists(loc: Location, paths: list[str]) -> list[bool]:
    try:
        infos = loc.fs.get_file_info(paths)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(loc, "list", error) from None
    return [info.type == pafs.FileType.File for info in infos]


def _read_json(loc: Location, path: str, where: str) -> Any:
    try:
        with loc.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(loc, "read", error, f" ({where})") from None
    except ValueError as error:
        raise InputDataError(f"Cannot read {where} of Hugging Face dataset {loc.uri}: "
                             f"{error}.") from None


def hf_shard_paths(loc: Location, split: str | None) -> list[str] | None:
    """The .arrow files of the Dataset (or of the DatasetDict's split) at `loc`, sorted; None
    when `loc` holds neither state.json nor dataset_dict.json."""
    has_state, has_dict = _exists(loc, [_join(loc.path, STATE), _join(loc.path, DATASET_DICT)])
    if has_dict:
        return _dataset_files(loc, _join(loc.path, _pick_split(loc, split)), None)
    if has_state:
        return _dataset_files(loc, loc.path, split)
    return None


def _pick_split(loc: Location, split: str | None) -> str:
    listing = _read_json(loc, _join(loc.path, DATASET_DICT), DATASET_DICT)
    splits = listing.get("splits") if isinstance(listing, dict) else None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise InputDataError(f"Hugging Face DatasetDict {loc.uri}: {DATASET_DICT} lists no "
                             'splits (expected {"splits": ["train", ...]}).')
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None:
        raise InputDataError(
            f"Input {loc.uri} is a Hugging Face DatasetDict with splits {', '.join(splits)}; "
            "set input.split to the one to read."
        )
    if split not in splits:
        raise InputDataError(
            f"input.split {split!r} is not a split of Hugging Face DatasetDict {loc.uri}; its "
            f"splits are: {', '.join(splits)}."
        )
    return split


def _dataset_files(loc: Location, folder: str, split: str | None) -> list[str]:
    where = folder if loc.is_local else f"{loc.scheme}://{folder}"
    if not _exists(loc, [_join(folder, STATE)])[0]:
        raise InputDataError(f"Hugging Face dataset folder {where} has no {STATE}.")
    state = _read_json(loc, _join(folder, STATE), STATE)
    if not isinstance(state, dict):
        raise InputDataError(f"{STATE} of Hugging Face dataset {where} is not a JSON object.")
    if split is not None and state.get("_split") != split:
        raise InputDataError(
            f"input.split is {split!r} but {where} is a single Hugging Face Dataset (split "
            f"{state.get('_split')!r}), not a DatasetDict; drop input.split."
        )
    listed = state.get("_data_files")
    if isinstance(listed, list) and listed:
        names = [item.get("filename") if isinstance(item, dict) else None for item in listed]
        if not all(isinstance(name, str) and name for name in names):
            raise InputDataError(f"{STATE} of Hugging Face dataset {where} lists a data file "
                                 "without a filename.")
    else:
        try:
            infos = loc.fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except (OSError, pa.ArrowException) as error:
            raise describe_os_error(loc, "list", error) from None
        names = [info.base_name for info in infos
                 if info.type == pafs.FileType.File and info.base_name.endswith(".arrow")]
    if not names:
        raise InputDataError(f"Hugging Face dataset {where} has no .arrow data files.")
    return sorted(_join(folder, name) for name in names)


def read_arrow_stream(loc: Location, path: str, batch_rows: int) -> Iterator[pa.Table]:
    """The rows of one .arrow file (IPC stream format) in tables of about `batch_rows` rows;
    a file without rows gives one empty table with its columns. The `datasets` library's
    schema metadata (its features) is dropped: the reader renames and retypes columns."""
    with loc.fs.open_input_stream(path) as stream:
        reader = pa.ipc.open_stream(stream)
        schema = reader.schema.remove_metadata()
        held: list[pa.RecordBatch] = []
        rows = 0
        given = False
        for batch in reader:
            if not batch.num_rows:
                continue
            held.append(batch)
            rows += batch.num_rows
            if rows >= batch_rows:
                yield pa.Table.from_batches(held).replace_schema_metadata(None)
                held, rows, given = [], 0, True
        if held:
            yield pa.Table.from_batches(held).replace_schema_metadata(None)
        elif not given:
            yield schema.empty_table()
