"""The report's "Diversity and checks" section: per generating LLM step, how varied its inputs
and its kept outputs are (the summary's `diversity` figures, augment_ray/curate/diversity.py)
and the share of its outputs that passed each of its checks (`checks_passed`)."""

from __future__ import annotations

from html import escape
from typing import Any

from augment_ray.report import charts
from augment_ray.report.charts import KEPT, PALETTE, Panel
from augment_ray.report.load import RunView
from augment_ray.report.tables import Section, absent, noted, table

ANCHOR, TITLE = "diversity", "Diversity and checks"
INPUTS, OUTPUTS = PALETTE[0], PALETTE[1]

NOTE = (
    "Texts embedded with {embedder} on a seeded sample of each side, both sides of a step cut "
    "to the same number of texts (the Vendi score grows with it). Mean cosine distance: the "
    "average of 1 - cos(a, b) over all pairs of texts (0: all the same). Vendi score "
    "(Friedman & Dieng 2023): exp of the entropy of the eigenvalues of the cosine-similarity "
    "matrix divided by n, the effective number of distinct texts (1 to n). Share passing a "
    "check: 1 - rows the check rejected / rows the step checked (the rows it created, or got, "
    "including any rejected before a check ran, e.g. unparsable answers); a row counts against "
    "its first failed check only."
)


def _sides(entry: dict[str, Any]) -> str:
    columns = entry["diversity"]
    if columns.get("new_rows"):
        return (f"inputs: {columns.get('input')!r} of the seed rows the step got; outputs: "
                f"{columns.get('output')!r} of the rows it created that were kept")
    return (f"inputs: {columns.get('input')!r} of the rows the step got; outputs: "
            f"{columns.get('output')!r} of those rows that were kept")


def _figure(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _threshold(value: Any) -> str:
    return "on" if value is True else str(value)


def _measured(name: str, figures: dict[str, Any], shares: dict[str, float] | None
              ) -> tuple[list[str], list[str]]:
    """The chart and tables of one step that has diversity figures."""
    inputs, outputs = figures["inputs"], figures["outputs"]
    sides = ((f"inputs ({inputs['n']:,} texts)", inputs, INPUTS),
             (f"outputs ({outputs['n']:,} texts)", outputs, OUTPUTS))
    groups = [
        Panel(f"Vendi score (effective distinct texts, at most {max(inputs['n'], outputs['n'])})",
              tuple((label, side["vendi"], color) for label, side, color in sides
                    if side["vendi"] is not None),
              top=max(inputs["n"], outputs["n"]) or None),
        Panel("Mean pairwise cosine distance",
              tuple((label, side["mean_cosine_distance"], color) for label, side, color in sides
                    if side["mean_cosine_distance"] is not None), top=1.0),
    ]
    if shares:
        groups.append(Panel("Share of the checked rows passing each check",
                            tuple((reason, share, KEPT) for reason, share in shares.items()),
                            top=1.0, percent=True))
    rows = [(side, figures.get(column, ""), figures[side]["n"],
             _figure(figures[side]["mean_cosine_distance"], 4), _figure(figures[side]["vendi"], 2))
            for side, column in (("inputs", "input"), ("outputs", "output"))]
    t_html, t_md = table(["side", "column", "texts", "mean cosine distance", "Vendi score"],
                         rows, numeric=(2, 3, 4))
    chart = charts.panels(groups, f"{name}: diversity of inputs vs outputs")
    return [chart, t_html], [t_md]


def _checks(entry: dict[str, Any]) -> tuple[str, str]:
    checks = entry.get("checks")
    shares = entry.get("checks_passed") or {}
    if not isinstance(checks, dict):
        return absent("The step's summary lists no checks.")
    if not checks:
        return absent("All of the step's checks are off.")
    rejected = entry.get("rejected") or {}
    rows = [(reason, _threshold(threshold), rejected.get(reason, 0),
             f"{100 * shares[reason]:.1f}%" if reason in shares else "-")
            for reason, threshold in checks.items()]
    return table(["check", "threshold", "rows rejected", "share passing"], rows,
                 numeric=(2, 3))


def diversity_section(view: RunView) -> Section:
    steps = [s for s in view.summary.get("steps", []) if isinstance(s.get("diversity"), dict)]
    if not steps:
        return Section(ANCHOR, TITLE, *absent(
            "No diversity figures in this run's summary: no generating LLM step (refine, "
            "expand, pair_expand, respond) ran, or the run predates them."))
    html: list[str] = []
    md: list[str] = []
    embedders = set()
    for entry in steps:
        name, figures = entry["name"], entry["diversity"]
        html.append(f"<h3>{escape(name)} ({escape(str(entry.get('kind', '')))})</h3>"
                    f'<p class="note">{escape(_sides(entry))}.</p>')
        md += [f"### {name} ({entry.get('kind', '')})", f"{_sides(entry)}."]
        if isinstance(figures.get("inputs"), dict) and isinstance(figures.get("outputs"), dict):
            embedders.add(str(figures.get("embedder", "the embedding model")))
            part_html, part_md = _measured(name, figures, entry.get("checks_passed"))
            html += part_html
            md += part_md
        else:
            none_html, none_md = absent(
                "Diversity not measured in this run (report.diversity_sample: 0, or the "
                "embedding model could not be loaded: the run's log says why).")
            html.append(none_html)
            md.append(none_md)
        c_html, c_md = _checks(entry)
        html.append(c_html)
        md.append(c_md)
    note = NOTE.format(embedder=", ".join(sorted(embedders)) or "the embedding model")
    return noted(ANCHOR, TITLE, html, md, note)
