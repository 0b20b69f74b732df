"""Job files are YAML with Airflow-style run-date placeholders ({ds}, {ds_nodash}, ...)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from augment_ray.errors import JobSpecError

# Airflow's names for the run date, so nightly job files read the same in both
DATE_PLACEHOLDERS = ("{ds}", "{ds_nodash}", "{yesterday_ds}", "{yesterday_ds_nodash}")
_DS = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def today_ds() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def check_ds(ds: str) -> str:
    """`ds` if it is a real YYYY-MM-DD date, else a JobSpecError."""
    try:
        if not _DS.match(ds):
            raise ValueError
        datetime.strptime(ds, "%Y-%m-%d")
    except ValueError:
        raise JobSpecError(f"--ds {ds!r} is not a date in YYYY-MM-DD form.") from None
    return ds


def render_dates(data: Any, ds: str) -> Any:
    """Every string in the parsed job with {ds} (YYYY-MM-DD), {ds_nodash} (YYYYMMDD) and their
    yesterday_ forms filled in. Other braces are left alone."""
    day = datetime.strptime(check_ds(ds), "%Y-%m-%d")
    yesterday = day - timedelta(days=1)
    values = {
        "{ds}": day.strftime("%Y-%m-%d"), "{ds_nodash}": day.strftime("%Y%m%d"),
        "{yesterday_ds}": yesterday.strftime("%Y-%m-%d"),
        "{yesterday_ds_nodash}": yesterday.strftime("%Y%m%d"),
    }
    if isinstance(data, str):
        for placeholder, value in values.items():
            data = data.replace(placeholder, value)
        return data
    if isinstance(data, dict):
        return {key: render_dates(value, ds) for key, value in data.items()}
    if isinstance(data, list):
        return [render_dates(value, ds) for value in data]
    return data


def uses_dates(data: Any) -> bool:
    if isinstance(data, str):
        return any(placeholder in data for placeholder in DATE_PLACEHOLDERS)
    if isinstance(data, dict):
        return any(uses_dates(value) for value in data.values())
    if isinstance(data, list):
        return any(uses_dates(value) for value in data)
    return False


def read_job_yaml(path: str | Path, ds: str | None = None) -> Any:
    """The YAML of a job file with its date placeholders filled in (`ds`, default today in
    UTC), or a JobSpecError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"Job file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JobSpecError(f"Job file {path} cannot be read: {error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JobSpecError(f"{path} is not valid YAML{where}: {problem}.") from None
    return render_dates(data, ds or today_ds())


