"""RunView -> report sections -> one self-contained HTML page and a Markdown summary.

Each section holds its HTML (tables, inline SVG) and its Markdown (the same tables, no charts),
so the two documents always say the same thing.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np
import pyarrow.compute as pc

from augment_ray.report import charts
from augment_ray.report.charts import KEPT, REJECTED, Bar, Segment
from augment_ray.report.diversity import diversity_section
from augment_ray.report.load import ID, INSTRUCTION, OUTPUT, RunView, created_rows
from augment_ray.report.tables import (
    CLIP,
    Section,
    absent,
    clip_text,
    noted,
    num,
    pct,
    plural,
    table,
)
from augment_ray.report.tokens import TokenCounter

SAMPLE_ROWS = 5
BEFORE, AFTER = "before", "after"
PROMPT = "#9ecae9"  # the prompt-token part of a bar, beside KEPT for generated tokens

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; max-width: 1100px;
       padding: 16px 24px 48px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 15px; margin-bottom: 6px; }
nav a { margin-right: 12px; } .note { color: #555; } .none { color: #777; font-style: italic; }
table { border-collapse: collapse; margin: 8px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.pairs { width: 100%; table-layout: fixed; }
table.pairs td { white-space: pre-wrap; word-wrap: break-word; font-size: 13px; }
table.pairs th:first-child { width: 10em; }
.meta { color: #666; font-size: 12px; } svg.chart { display: block; margin: 6px 0; max-width: 100%;
  height: auto; }
"""


def _stats(values: Sequence[float]) -> list[Any]:
    if not values:
        return [0, "-", "-", "-", "-"]
    array = np.asarray(values, dtype=float)
    return [len(values), f"{array.mean():.1f}", f"{np.median(array):g}",
            f"{np.percentile(array, 90):g}", f"{array.max():g}"]


def _stats_float(values: Sequence[float]) -> list[Any]:
    if not values:
        return [0, "-", "-", "-", "-"]
    array = np.asarray(values, dtype=float)
    return [len(values), f"{array.mean():.3f}", f"{np.median(array):.3f}",
            f"{array.min():.3f}", f"{array.max():.3f}"]


def _distribution(series: Sequence[tuple[str, Sequence[float]]], title: str,
                  integer: bool) -> str:
    """A histogram of every series over shared bins, as % of each series' rows."""
    everything = [v for _, values in series for v in values]
    edges = charts.bin_edges(everything, integer=integer)
    open_top = bool(everything) and max(everything) >= edges[-1]
    labels = charts.bin_labels(edges, integer, open_top)
    shares = []
    for name, values in series:
        counts = charts.histogram_counts(values, edges)
        total = sum(counts) or 1
        shares.append((f"{name} ({len(values):,} rows)", [100 * c / total for c in counts]))
    return charts.columns(labels, shares, title, "% of rows")


# ---------------------------------------------------------------------------- sections


def run_section(view: RunView) -> Section:
    s, m = view.summary, view.manifest
    started = s.get("started_at", "")
    rows = [
        ("job", s.get("job", "")), ("run id", s.get("run_id", "")), ("started", started),
        ("wall time", f"{s.get('wall_seconds', 0):,.1f} s"),
        ("input", f"{s.get('input', {}).get('uri', '')} "
                  f"({plural(s.get('input', {}).get('files', 0), 'file')})"),
        ("output", f"{view.uri} ({plural(s.get('output', {}).get('files', 0), 'data file')}, "
                   f"{plural(s.get('output', {}).get('reject_files', 0), 'reject file')})"),
        ("rows", f"{num(s.get('rows_in', 0))} in, {num(s.get('rows_out', 0))} out, "
                 f"{num(s.get('rows_rejected', 0))} rejected"),
        ("tokens", f"{num(s.get('prompt_tokens', 0))} prompt, "
                   f"{num(s.get('completion_tokens', 0))} generated "
                   f"({s.get('completion_tokens_per_second', 0):,.1f} tok/s over the run)"),
    ]
    versions = m.get("code_version")
    if isinstance(versions, dict):
        rows.append(("written by", ", ".join(f"{k} {v}" for k, v in versions.items())))
    html, md = table(["", "this run"], rows)
    accounting = s.get("accounting")
    if isinstance(accounting, dict) and accounting:
        a_html, a_md = table(["accounting", "value"],
                             [(k, v if isinstance(v, int | float | str) else str(v))
                              for k, v in accounting.items()], numeric=(1,))
        html += "<h3>Accounting</h3>" + a_html
        md += "\n\n### Accounting\n\n" + a_md
    else:
        none = absent("No accounting block in this run's summary.")
        html += none[0]
        md += "\n\n" + none[1]
    return Section("run", "Run", html, md)


def funnel_section(view: RunView) -> Section:
    steps = view.summary.get("steps", [])
    if not steps:
        return Section("funnel", "Rows per step", *absent("No steps in this run's summary."))
    rows, bars = [], []
    for step in steps:
        created = step.get("rows_created", 0)
        rejected = sum(step.get("rejected", {}).values())
        rows.append((step["name"], step.get("kind", ""), step.get("rows_in", 0), created,
                     rejected, step.get("rows_out", 0)))
        bars.append(Bar(step["name"], (Segment(step.get("rows_out", 0), KEPT, "rows out"),
                                       Segment(rejected, REJECTED, "rejected here"))))
    html, md = table(["step", "kind", "rows in", "created", "rejected", "rows out"], rows,
                     numeric=(2, 3, 4, 5))
    chart = charts.hbars(bars, "Rows per step: out and rejected")
    note = ("Each bar is the rows a step handled (rows in + created): the rows it passed on and "
            "the rows it rejected.")
    return Section("funnel", "Rows per step",
                   f'{chart}<p class="note">{escape(note)}</p>{html}', md)


def rejections_section(view: RunView) -> Section:
    reasons: dict[str, int] = view.summary.get("rejected_by_reason", {})
    if not reasons:
        return Section("rejections", "Rejections", *absent("No rejected rows in this run."))
    handled = {s["name"]: s.get("rows_in", 0) + s.get("rows_created", 0)
               for s in view.summary.get("steps", [])}
    ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    rows = []
    for key, count in ordered:
        step, _, reason = key.partition(":")
        example = view.reject_examples.get((step, reason), "")
        rows.append((step, reason, count, pct(count, handled.get(step, 0)),
                     clip_text(example, 160)))
    html, md = table(["step", "reason", "rows", "share of the step's rows", "example detail"],
                     rows, numeric=(2, 3))
    chart = charts.hbars([Bar(k, (Segment(v, REJECTED, "rejected"),)) for k, v in ordered],
                         "Rejected rows by step:reason")
    return Section("rejections", "Rejections", chart + html, md)


def lengths_section(view: RunView, counter: TokenCounter) -> Section:
    after_instruction = view.columns.instruction_after
    texts = {
        (BEFORE, "instruction"): view.before[INSTRUCTION].to_pylist(),
        (BEFORE, "response"): view.before[OUTPUT].to_pylist(),
        (AFTER, "instruction"): _final_instructions(view),
        (AFTER, "response"): view.after[OUTPUT].to_pylist(),
    }
    lengths = {key: [float(n) for n in counter.count(values)] for key, values in texts.items()}
    unit = counter.unit
    where = {BEFORE: f"input rows, instruction ({view.before.num_rows:,} of "
                     f"{view.before_total:,} sampled)",
             AFTER: f"kept rows, {after_instruction} ({view.after.num_rows:,} of "
                    f"{view.after_total:,} sampled)"}
    note = (f"Counted in {unit}: {counter.note}. Before: the instruction and output of the input "
            "rows (data/ and _rejects/, origin_step = input); after: the kept rows in data/, "
            f"instruction from {after_instruction!r}, response from 'output'. Null texts are "
            "not counted.")
    html = [f'<p class="note">{escape(note)}</p>']
    md = [note]
    for field in ("instruction", "response"):
        before, after = lengths[(BEFORE, field)], lengths[(AFTER, field)]
        rows = [[BEFORE, *_stats(before)], [AFTER, *_stats(after)]]
        t_html, t_md = table(["side", "rows", "mean", "median", "p90", "max"], rows,
                             numeric=(1, 2, 3, 4, 5))
        title = f"{field.capitalize()} length ({unit})"
        html.append(f"<h3>{escape(title)}</h3>")
        md.append(f"### {title}\n\n{t_md}")
        if before or after:
            html.append(_distribution([(BEFORE, before), (AFTER, after)],
                                      f"{title}: before vs after", integer=True))
        html.append(t_html)
    return noted("lengths", "Lengths before and after", html, md,
                  f"{where[BEFORE]}; {where[AFTER]}.")


def _final_instructions(view: RunView) -> list[str | None]:
    final = view.after[view.columns.instruction_after].to_pylist()
    original = view.after[INSTRUCTION].to_pylist()
    # rows the refine step did not touch (created later, say) keep their own instruction
    return [f if f is not None else o for f, o in zip(final, original, strict=True)]


def scores_section(view: RunView) -> Section:
    if not view.columns.scores:
        return Section("scores", "Scores", *absent("No score columns in this run."))
    html, md = [], []
    for column in view.columns.scores:
        kept = [float(v) for v in view.after[column].to_pylist() if v is not None]
        rejected = ([float(v) for v in view.rejected[column].to_pylist() if v is not None]
                    if column in view.rejected.column_names else [])
        rows = [["kept", *_stats_float(kept)], ["rejected", *_stats_float(rejected)]]
        t_html, t_md = table(["rows", "with a value", "mean", "median", "min", "max"], rows,
                             numeric=(1, 2, 3, 4, 5))
        html.append(f"<h3>{escape(column)}</h3>")
        if kept or rejected:
            html.append(_distribution([("kept", kept), ("rejected", rejected)],
                                      f"{column}: kept vs rejected", integer=False))
        html.append(t_html)
        md.append(f"### {column}\n\n{t_md}")
    note = (f"Sampled: {view.after.num_rows:,} of {view.after_total:,} kept rows, "
            f"{view.rejected.num_rows:,} of {view.rejected_total:,} rejected rows.")
    return noted("scores", "Scores", html, md, note)


def duplicates_section(view: RunView) -> Section:
    if not view.columns.dedup:
        return Section("duplicates", "Duplicate clusters", *absent("No dedup step in this run."))
    html, md = [], []
    for step in view.columns.dedup:
        clusters = view.clusters.get(step, Counter())
        html.append(f"<h3>{escape(step)}</h3>")
        md.append(f"### {step}")
        if not clusters:
            none = absent(f"No duplicates found by {step} in this run.")
            html.append(none[0])
            md.append(none[1])
            continue
        sizes = Counter(clusters.values())
        removed = sum(clusters.values()) - len(clusters)
        summary = (f"{plural(len(clusters), 'cluster')} of duplicates: {removed:,} rows "
                   "rejected, one row kept per cluster (a cluster is the kept row and every row "
                   "that duplicates it).")
        rows = [(size, sizes[size], size * sizes[size]) for size in sorted(sizes)]
        t_html, t_md = table(["cluster size (rows)", "clusters", "rows"], rows,
                             numeric=(0, 1, 2))
        largest = clusters.most_common(SAMPLE_ROWS)
        l_html, l_md = table(["kept id", "cluster size"], largest, numeric=(1,))
        chart = charts.columns([str(size) for size in sorted(sizes)],
                               [("clusters", [sizes[size] for size in sorted(sizes)])],
                               f"{step}: clusters by size (rows)", "clusters")
        html += [f'<p class="note">{escape(summary)}</p>', chart, t_html,
                 "<p>Largest clusters:</p>", l_html]
        md += [summary, t_md, "Largest clusters:", l_md]
    return Section("duplicates", "Duplicate clusters", "".join(html), "\n\n".join(md))


def labels_section(view: RunView) -> Section:
    if not view.columns.labels:
        return Section("labels", "Task categories and languages",
                       *absent("No task category or language columns in this run."))
    html, md = [], []
    for column in view.columns.labels:
        before, after = view.labels_before[column], view.labels_after[column]
        keys = sorted(set(before) | set(after), key=lambda k: (-after[k], -before[k], k))
        b_total, a_total = sum(before.values()), sum(after.values())
        rows = [(k, before[k], pct(before[k], b_total), after[k], pct(after[k], a_total))
                for k in keys]
        t_html, t_md = table([column, "before: rows", "before: share", "after: rows",
                              "after: share"], rows, numeric=(1, 2, 3, 4))
        chart = charts.columns(
            keys, [(f"before ({b_total:,} rows)",
                    [100 * before[k] / (b_total or 1) for k in keys]),
                   (f"after ({a_total:,} rows)",
                    [100 * after[k] / (a_total or 1) for k in keys])],
            f"{column}: before vs after", "% of rows")
        html += [f"<h3>{escape(column)}</h3>", chart, t_html]
        md += [f"### {column}", t_md]
    note = ("Exact counts. Before: input rows (data/ and _rejects/) that have a label (rows "
            "rejected before the labelling step have none); after: every kept row.")
    return noted("labels", "Task categories and languages", html, md, note)


def samples_section(view: RunView) -> Section:
    html, md = [], []
    refine = view.columns.refine_column
    html.append("<h3>Seed vs refined</h3>")
    md.append("### Seed vs refined")
    if refine is None:
        none = absent("No refine step in this run.")
        html.append(none[0])
        md.append(none[1])
    else:
        refined = view.after.filter(pc.is_valid(view.after[refine])).sort_by(ID)
        pairs = [(r[ID], clip_text(r[INSTRUCTION]), clip_text(r[refine]))
                 for r in refined.slice(0, SAMPLE_ROWS).to_pylist()]
        if pairs:
            t_html, t_md = table(["id", "instruction (seed)", refine], pairs, css="pairs")
            html.append(t_html)
            md.append(t_md)
        else:
            none = absent(f"No kept row has {refine} in this run.")
            html.append(none[0])
            md.append(none[1])
    html.append("<h3>Seed vs created rows</h3>")
    md.append("### Seed vs created rows")
    created = created_rows(view, SAMPLE_ROWS)
    if not created:
        none = absent("No created rows (expand, pair_expand) in this run.")
        html.append(none[0])
        md.append(none[1])
    else:
        rows = []
        for row in created:
            parent = view.parents.get(row["_parent"], {})
            seed = clip_text(parent.get(INSTRUCTION)) if parent else f"(parent {row['_parent']} " \
                "not found)"
            made = clip_text(row[INSTRUCTION])
            if row.get(OUTPUT):
                made += "\n\n→ " + clip_text(row[OUTPUT], 300)
            rows.append((row["_step"], seed, made))
        t_html, t_md = table(["step", "parent instruction (seed)", "created row"], rows,
                             css="pairs")
        html.append(t_html)
        md.append(t_md)
    note = (f"Up to {SAMPLE_ROWS} rows each, the lowest ids of the sampled kept rows; long "
            f"texts are cut at {CLIP} characters.")
    return noted("samples", "Sample rows", html, md, note)


def tokens_section(view: RunView) -> Section:
    s = view.summary
    steps = [step for step in s.get("steps", []) if "completion_tokens" in step]
    if not steps:
        return Section("tokens", "Tokens and time",
                       *absent(f"No model tokens in this run (wall time "
                              f"{s.get('wall_seconds', 0):,.1f} s)."))
    rows = []
    for step in steps:
        handled = step.get("rows_in", 0) + step.get("rows_created", 0)
        rows.append((step["name"], step.get("model", ""), step.get("prompt_tokens", 0),
                     step.get("completion_tokens", 0),
                     f"{step.get('completion_tokens', 0) / handled:.1f}" if handled else "-"))
    rows.append(("run", "", s.get("prompt_tokens", 0), s.get("completion_tokens", 0), ""))
    html, md = table(["step", "model", "prompt tokens", "generated tokens",
                      "generated per row in"], rows, numeric=(2, 3, 4))
    chart = charts.hbars(
        [Bar(step["name"], (Segment(step.get("prompt_tokens", 0), PROMPT, "prompt"),
                            Segment(step.get("completion_tokens", 0), KEPT, "generated")))
         for step in steps], "Tokens per step")
    note = (f"Run wall time {s.get('wall_seconds', 0):,.1f} s; "
            f"{s.get('completion_tokens_per_second', 0):,.1f} generated tokens/s over the whole "
            "run.")
    timed = [step for step in s.get("steps", []) if "first_rows_at_s" in step]
    if timed:
        time_html, time_md = table(
            ["step", "first rows out at (s)", "last rows out at (s)"],
            [(step["name"], f"{step['first_rows_at_s']:,.1f}", f"{step['last_rows_at_s']:,.1f}")
             for step in timed], numeric=(1, 2))
        html += time_html
        md += "\n\n" + time_md
        note += (" Times are seconds since the run started; steps stream concurrently, so they "
                 "overlap instead of adding up.")
    else:
        note += " Steps stream concurrently, so there is no wall time per step."
    return Section("tokens", "Tokens and time",
                   f'{chart}{html}<p class="note">{escape(note)}</p>', f"{md}\n\n{note}")



def build_sections(view: RunView, counter: TokenCounter) -> list[Section]:
    return [
        run_section(view), funnel_section(view), rejections_section(view),
        lengths_section(view, counter), diversity_section(view), scores_section(view),
        duplicates_section(view), labels_section(view), samples_section(view),
        tokens_section(view),
    ]


def render_html(view: RunView, sections: list[Section], limit: int) -> str:
    job = view.summary.get("job", "")
    made = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>{s.html}</section>'
                   for s in sections)
    note = sampling_note(view, limit)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>augment-ray report: {escape(job)} {escape(view.summary.get('run_id', ''))}"
        f"</title><style>{CSS}</style></head><body>"
        f"<h1>augment-ray report: {escape(job)}</h1>"
        f'<p class="meta">run {escape(view.summary.get("run_id", ""))} · '
        f"{escape(view.uri)} · report made {made}</p>"
        f'<p class="note">{escape(note)}</p><nav>{nav}</nav>{body}</body></html>\n'
    )


def sampling_note(view: RunView, limit: int) -> str:
    return (f"Counts of rows, rejections, duplicate clusters and labels are exact. Lengths, "
            f"scores and sample rows come from a uniform random sample of at most {limit:,} rows "
            f"per side: input rows {view.before.num_rows:,} of {view.before_total:,}, kept rows "
            f"{view.after.num_rows:,} of {view.after_total:,}.")


def render_markdown(view: RunView, sections: list[Section], limit: int) -> str:
    job = view.summary.get("job", "")
    parts = [f"# augment-ray report: {job}", f"Run {view.summary.get('run_id', '')} · {view.uri}",
             sampling_note(view, limit) + " Charts: report.html."]
    parts += [f"## {s.title}\n\n{s.markdown}" for s in sections]
    return "\n\n".join(parts) + "\n"
