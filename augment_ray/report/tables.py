"""The pieces every report section is made of: a Section (its HTML and Markdown), tables that
render to both, and the small number and text formats they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

CLIP = 600


@dataclass
class Section:
    anchor: str
    title: str
    html: str
    markdown: str


def num(value: Any) -> str:
    """A number with thousands separators (other values as they are)."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def plural(number: int, noun: str) -> str:
    return f"{number:,} {noun}" + ("" if number == 1 else "s")


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def clip_text(text: Any, limit: int = CLIP) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def md_cell(value: Any) -> str:
    # escaped like HTML too: Markdown renderers pass raw tags (a row's "<script>") through
    text = escape(str(value), quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          numeric: Sequence[int] = (), css: str = "") -> tuple[str, str]:
    """(HTML, Markdown) of one table; `numeric` columns are right-aligned in HTML. Markdown
    numbers carry no thousands separators, so scripts can read them back."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{escape(num(v))}</td>' if i in numeric else f"<td>{escape(str(v))}</td>"
            for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    klass = f' class="{css}"' if css else ""
    html = f"<table{klass}><tr>{head}</tr>{''.join(body)}</table>"
    md = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
          "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
    md += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
    return html, "\n".join(md)


def noted(anchor: str, title: str, html: list[str], md: list[str], note: str) -> Section:
    """A section of HTML and Markdown parts that ends with a note on what it shows."""
    return Section(anchor, title, "".join([*html, f'<p class="meta">{escape(note)}</p>']),
                   "\n\n".join([*md, note]))


def absent(text: str) -> tuple[str, str]:
    return f'<p class="none">{escape(text)}</p>', f"_{text}_"
