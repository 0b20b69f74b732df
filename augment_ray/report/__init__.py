"""`augment-ray report`: a self-contained HTML page and a Markdown summary of a finished run.

load.py reads the output into views (exact counts, sampled text), tokens.py counts lengths,
charts.py draws inline SVG, render.py lays out the sections of both documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from augment_ray.errors import StorageError
from augment_ray.report.load import SAMPLE_LIMIT, load_run
from augment_ray.report.render import build_sections, render_html, render_markdown
from augment_ray.report.tokens import TokenCounter, load_counter
from augment_ray.storage import Location, describe_os_error

REPORT_DIR = "_report"  # `_`-prefixed: Parquet readers of OUTPUT skip it
HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"


@dataclass(frozen=True)
class Report:
    html: str
    markdown: str


def build_report(output: Location, counter: TokenCounter | None = None,
                 limit: int = SAMPLE_LIMIT) -> Report:
    view = load_run(output, limit)
    sections = build_sections(view, counter or load_counter())
    return Report(render_html(view, sections, limit), render_markdown(view, sections, limit))


def _write(target: Location, text: str) -> None:
    try:
        with target.fs.open_output_stream(target.path) as stream:
            stream.write(text.encode("utf-8"))
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(target, "write", error) from None


def write_report(output: Location, to: Path | None = None) -> list[str]:
    """Build the report of the finished run at `output` and write report.html and report.md
    into OUTPUT/_report/ (or the local folder `to`); returns where they went."""
    report = build_report(output)  # first: an unfinished run leaves nothing behind
    if to is not None:
        if to.exists() and not to.is_dir():
            raise StorageError(f"{to} is a file; --to names a folder for report.html and "
                               "report.md.")
        try:
            to.mkdir(parents=True, exist_ok=True)
            (to / HTML_NAME).write_text(report.html, encoding="utf-8")
            (to / MARKDOWN_NAME).write_text(report.markdown, encoding="utf-8")
        except OSError as error:
            raise StorageError(f"Cannot write the report into {to}: {error}.") from None
        return [str(to / HTML_NAME), str(to / MARKDOWN_NAME)]
    folder = output.join(REPORT_DIR)
    try:
        folder.fs.create_dir(folder.path, recursive=True)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(folder, "write", error) from None
    written = []
    for name, text in ((HTML_NAME, report.html), (MARKDOWN_NAME, report.markdown)):
        target = folder.join(name)
        _write(target, text)
        written.append(target.path if target.is_local else target.uri)
    return written
