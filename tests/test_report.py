"""`augment-ray report`: a real run (refine with the bundled model, dedup_exact, filter) on a
local Ray, reported through the real CLI and opened in a real headless Chromium; plus a
hand-made output with created rows, scores and labels, written to a local S3 server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augment_ray.config.base import StorageOptions
from augment_ray.config.job import parse_job
from augment_ray.report import build_report, write_report
from augment_ray.report.tokens import whitespace_counter
from augment_ray.storage import Location
from augment_ray.summary import format_summary

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
CLI = [sys.executable, "-m", "augment_ray.cli"]
CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("Run", "Rows per step", "Rejections", "Lengths before and after",
            "Diversity and checks", "Scores", "Duplicate clusters",
            "Task categories and languages", "Sample rows", "Tokens and time")
ESCAPE_ME = "Explain <script>alert(1)</script> & <b>tags</b> in HTML."
# planted copies of seed rows (case and spacing changed: dedup_exact folds both); ids sort
# after the seeds' "seed_task_*", so the seeds are the rows kept
PLANTED = {0: 3, 1: 1, 2: 1}  # seed position -> copies: clusters of 4, 2 and 2 rows


def seed_rows(n: int) -> list[dict]:
    rows = [r for r in pq.read_table(SAMPLE).to_pylist()
            if "http" not in json.dumps(r) and len(r["output"] or "") >= 10]
    return rows[:n]


def planted_input(folder: Path) -> list[dict]:
    rows = seed_rows(24)
    copies = []
    for position, count in PLANTED.items():
        for k in range(count):
            seed = rows[position]
            text = seed["instruction"].upper() if k % 2 else f"  {seed['instruction']}  "
            copies.append({**seed, "id": f"zz-copy-{position}-{k}", "instruction": text})
    rows.append({**rows[5], "id": "aa-escape", "instruction": ESCAPE_ME})
    short = {**rows[6], "id": "zz-short", "instruction": "Say hi.", "output": "hi"}
    folder.mkdir()
    table = pa.Table.from_pylist(rows + copies + [short])
    pq.write_table(table.slice(0, 16), folder / "part-0.parquet")
    pq.write_table(table.slice(16), folder / "part-1.parquet")
    return table.to_pylist()


@pytest.fixture(scope="module")
def finished_run(local_ray, tmp_path_factory) -> Path:
    from augment_ray.pipeline import run_job

    base = tmp_path_factory.mktemp("report")
    planted_input(base / "in")
    out = base / "out"
    run_job(parse_job({
        "name": "report-test",
        "input": {"uri": str(base / "in"), "format": "parquet"},
        "output": {"uri": str(out), "mode": "overwrite"},
        "engines": {"small": {"kind": "transformers", "model": "bundled", "replicas": 1,
                              "num_cpus": 1, "threads": 1, "batch_size": 4,
                              "sampling": {"temperature": 0.0, "max_tokens": 12}}},
        "steps": [
            # 12-token rewrites are cut short: the rewrite checks would reject most of them
            {"kind": "refine", "engine": "small", "checks": False},
            {"kind": "dedup_exact"},
            {"kind": "filter", "min_response_chars": 10},
        ],
    }))
    return out


def markdown_section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.integration
def test_report_of_a_real_run_through_the_cli(finished_run):
    out = finished_run
    done = subprocess.run([*CLI, "report", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    html_path, md_path = out / "_report" / "report.html", out / "_report" / "report.md"
    assert done.stdout.split() == ["wrote", str(html_path), "wrote", str(md_path)]
    summary = json.loads((out / "_summary.json").read_text())
    markdown = md_path.read_text()
    html = html_path.read_text()

    # the funnel is the summary's, step by step
    funnel = markdown_section(markdown, "Rows per step")
    for step in summary["steps"]:
        row = (f"| {step['name']} | {step['kind']} | {step['rows_in']} | "
               f"{step.get('rows_created', 0)} | {sum(step['rejected'].values())} | "
               f"{step['rows_out']} |")
        assert row in funnel, (row, funnel)
    assert [s["name"] for s in summary["steps"]] == ["input", "refine", "dedup_exact", "filter"]
    for key, count in summary["rejected_by_reason"].items():
        step, _, reason = key.partition(":")
        assert f"| {step} | {reason} | {count} |" in markdown_section(markdown, "Rejections")
    assert summary["rejected_by_reason"]["dedup_exact:exact_duplicate"] == 5
    assert summary["rejected_by_reason"]["filter:min_response_chars"] >= 1

    # clusters: the kept seed and its planted copies
    duplicates = markdown_section(markdown, "Duplicate clusters")
    assert "| 2 | 2 | 4 |" in duplicates and "| 4 | 1 | 4 |" in duplicates
    assert "3 clusters of duplicates: 5 rows rejected" in duplicates
    lengths = markdown_section(markdown, "Lengths before and after")
    assert "SmolLM2-135M-Instruct tokenizer" in lengths
    assert "instruction from 'refined_instruction'" in lengths
    before = re.search(r"\| before \| (\d+) \|", lengths)
    assert before and int(before.group(1)) == summary["rows_in"]
    assert "No score columns in this run." in markdown
    assert "No task category or language columns in this run." in markdown
    assert "No created rows (expand, pair_expand) in this run." in markdown
    timing = markdown_section(markdown, "Tokens and time")
    assert f"| {summary['completion_tokens']} |" in timing
    refine = next(step for step in summary["steps"] if step["name"] == "refine")
    assert f"| refine | {refine['first_rows_at_s']:,.1f} | {refine['last_rows_at_s']:,.1f} |" \
        in timing

    # diversity: measured by the run on the kept rows, printed on the step's line, reported
    figures = refine["diversity"]
    assert (figures["input"], figures["output"], figures["new_rows"]) == (
        "instruction", "refined_instruction", False)
    assert figures["embedder"] == "all-MiniLM-L6-v2"
    # the refine step got every input row; the kept ones are the outputs, cut to the same size
    assert figures["inputs"]["n"] == figures["outputs"]["n"] == summary["rows_out"]
    for side in ("inputs", "outputs"):
        assert 1.0 < figures[side]["vendi"] <= figures[side]["n"]
        assert 0.0 < figures[side]["mean_cosine_distance"] < 1.0
    assert (f"diversity vendi {figures['inputs']['vendi']:.1f} -> "
            f"{figures['outputs']['vendi']:.1f}") in format_summary(summary)
    assert [s["name"] for s in summary["steps"] if "diversity" in s] == ["refine"]
    diversity = markdown_section(markdown, "Diversity and checks")
    for side, column in (("inputs", "instruction"), ("outputs", "refined_instruction")):
        assert (f"| {side} | {column} | {figures[side]['n']} | "
                f"{figures[side]['mean_cosine_distance']:.4f} | "
                f"{figures[side]['vendi']:.2f} |") in diversity, diversity
    assert "Texts embedded with all-MiniLM-L6-v2" in diversity
    assert "<title>refine: diversity of inputs vs outputs</title>" in html

    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    assert html.count("<svg") >= 7
    assert not re.search(r"https?://", html)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # seed vs refined: the escaped row has the lowest id, so it is among the samples
    samples = markdown_section(markdown, "Sample rows")
    assert "| aa-escape |" in samples and "refined_instruction" in samples

    # Parquet readers of the output do not see the report
    assert pq.read_table(out / "data").num_rows == summary["rows_out"]


@pytest.mark.integration
def test_report_opens_in_headless_chromium(finished_run, tmp_path):
    to = tmp_path / "report"
    done = subprocess.run([*CLI, "report", str(finished_run), "--to", str(to)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["wrote", str(to / "report.html"),
                                   "wrote", str(to / "report.md")]
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make setup-chromium installs it)")
    browser = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", (to / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert browser.returncode == 0, browser.stderr[-3000:]
    dom = browser.stdout
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in dom
    assert dom.count("<svg") >= 7 and "<rect" in dom
    assert "<title>refine: diversity of inputs vs outputs</title>" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    for error in ("Uncaught", "Failed to load resource"):
        assert error not in browser.stderr, browser.stderr[-3000:]


def test_an_unfinished_output_is_refused(tmp_path):
    out = tmp_path / "unfinished"
    (out / "_staging" / "data").mkdir(parents=True)
    (out / "_STARTED").write_text('{"run_id": "x"}')
    done = subprocess.run([*CLI, "report", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "is not a finished run (no _SUCCESS)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "_report").exists()


# ---------------------------------------------------------------------------- hand-made output


def _row(row_id: str, instruction: str, output: str | None, **extra) -> dict:
    return {"id": row_id, "instruction": instruction, "input": None, "output": output,
            "source_id": extra.pop("source_id", row_id),
            "origin_step": extra.pop("origin_step", "input"), "reject_step": None,
            "reject_reason": None, "reject_detail": None, "expand_parent_id": None,
            "score_confidence": None, "task_category": None, "language": None,
            "dedup_near_duplicate_of": None, **extra}


def handmade_output(fs, root: str) -> None:
    """A committed output as io/write.py lays it out: expand created rows, a score, labels,
    near duplicates and a resample step's by-column."""
    kept = [
        _row("s1", "Write a poem about the sea.", "Waves.", score_confidence=0.9,
             task_category="writing", language="en"),
        _row("s2", "What is 2 + 2?", "4", score_confidence=0.7, task_category="math",
             language="en"),
        _row("c1", "Write a haiku about rain.", "Drops fall.", origin_step="expand",
             source_id="s1", expand_parent_id="s1", score_confidence=0.8,
             task_category="writing", language="en"),
        _row("c2", "把这句话翻译成英文。", "Translate.", origin_step="expand", source_id="s3",
             expand_parent_id="s3", score_confidence=0.6, task_category="translation",
             language="zh"),
    ]
    rejected = [
        _row("s3", "翻译这句话。", None, reject_step="expand", reject_reason="seed_not_kept",
             task_category="translation", language="zh"),
        _row("s4", "Write a poem about the sea!", "Waves!", reject_step="dedup_near",
             reject_reason="near_duplicate", reject_detail="duplicate of s1",
             dedup_near_duplicate_of="s1", task_category="writing", language="en"),
        _row("s5", "Write a poem about the seas.", "Waves", reject_step="dedup_near",
             reject_reason="near_duplicate", reject_detail="duplicate of s1",
             task_category="writing", language="en"),  # the detail alone names the keeper
        _row("s6", "Is 3 prime?", "yes", reject_step="auto_filter",
             reject_reason="low_confidence", score_confidence=0.1, task_category="math",
             language="en"),
    ]
    schema = pa.schema([(k, pa.float64() if k == "score_confidence" else pa.string())
                        for k in kept[0]])
    files = {"data/part-00000-0000.parquet": kept, "_rejects/part-00000-0000.parquet": rejected}
    for name, rows in files.items():
        fs.create_dir(f"{root}/{name.split('/')[0]}", recursive=True)
        with fs.open_output_stream(f"{root}/{name}") as stream:
            pq.write_table(pa.Table.from_pylist(rows, schema), stream)
    steps = [
        {"name": "input", "kind": "read", "rows_in": 6, "rows_out": 6, "rejected": {}},
        {"name": "expand", "kind": "expand", "rows_in": 6, "rows_created": 2, "rows_out": 7,
         "rejected": {"seed_not_kept": 1}, "prompt_tokens": 120, "completion_tokens": 40,
         # what the run's diversity pass (curate/diversity.py) adds to a generating step
         "diversity": {"input": "instruction", "output": "instruction", "new_rows": True,
                       "inputs": {"n": 2, "mean_cosine_distance": 0.8123, "vendi": 1.93},
                       "outputs": {"n": 2, "mean_cosine_distance": 0.6, "vendi": 1.71},
                       "embedder": "all-MiniLM-L6-v2"},
         "checks": {"not_new": 0.9, "refusal": True},
         "checks_passed": {"not_new": 1.0, "refusal": 1.0}},
        # what the steps' describe() writes: the report finds its columns from these
        {"name": "dedup_near", "kind": "dedup_near", "duplicate_column": "dedup_near_duplicate_of",
         "rows_in": 7, "rows_created": 0, "rows_out": 5, "rejected": {"near_duplicate": 2}},
        {"name": "resample", "kind": "resample", "by": ["task_category", "language"],
         "label_columns": ["task_category", "language"], "rows_in": 5,
         "rows_created": 0, "rows_out": 5, "rejected": {}},
        {"name": "auto_filter", "kind": "auto_filter", "rows_in": 5, "rows_created": 0,
         "rows_out": 4, "rejected": {"low_confidence": 1}},
    ]
    summary = {"job": "handmade", "run_id": "20261122T000000Z-abcdef", "wall_seconds": 2.0,
               "input": {"uri": "in", "files": 1}, "output": {"uri": f"s3://{root}"},
               "rows_in": 6, "rows_out": 4, "rows_rejected": 4,
               "rejected_by_reason": {"expand:seed_not_kept": 1, "dedup_near:near_duplicate": 2,
                                      "auto_filter:low_confidence": 1},
               "prompt_tokens": 120, "completion_tokens": 40,
               "completion_tokens_per_second": 20.0, "steps": steps,
               "accounting": {"input_rows_read": 6, "input_rows_written": 6}}
    manifest = {"files": ["data/part-00000-0000.parquet"],
                "reject_files": ["_rejects/part-00000-0000.parquet"],
                "code_version": {"augment_ray": "test"}}
    for name, payload in (("_summary.json", summary), ("_manifest.json", manifest),
                          ("_SUCCESS", {"run_id": summary["run_id"]})):
        with fs.open_output_stream(f"{root}/{name}") as stream:
            stream.write(json.dumps(payload).encode())


def test_report_of_created_rows_scores_and_labels_on_s3(local_s3):
    options = StorageOptions(endpoint=local_s3.endpoint, region="us-east-1", addressing="path",
                             access_key_id_env=local_s3.key_id_env,
                             secret_access_key_env=local_s3.secret_env)
    output = Location(f"s3://{local_s3.bucket}/runs/handmade", options)
    handmade_output(output.fs, output.path)

    report = build_report(output, whitespace_counter("test"))
    markdown, html = report.markdown, report.html
    assert "Counted in words: whitespace-separated words (test)" in markdown
    created = markdown_section(markdown, "Sample rows")
    assert "| expand | Write a poem about the sea. | Write a haiku about rain. → Drops fall. |" \
        in created
    assert "| expand | 翻译这句话。 | 把这句话翻译成英文。 → Translate. |" in created
    assert "No refine step in this run." in created
    scores = markdown_section(markdown, "Scores")
    assert "| kept | 4 | 0.750 | 0.750 | 0.600 | 0.900 |" in scores
    assert "| rejected | 1 | 0.100 | 0.100 | 0.100 | 0.100 |" in scores
    labels = markdown_section(markdown, "Task categories and languages")
    # before: the six input rows; after: the four kept rows (two of them created)
    assert "| writing | 3 | 50.0% | 2 | 50.0% |" in labels
    assert "| zh | 1 | 16.7% | 1 | 25.0% |" in labels
    assert "| 3 | 1 | 3 |" in markdown_section(markdown, "Duplicate clusters")
    diversity = markdown_section(markdown, "Diversity and checks")
    assert "### expand (expand)" in diversity
    assert "'instruction' of the rows it created that were kept" in diversity
    assert "| inputs | instruction | 2 | 0.8123 | 1.93 |" in diversity
    assert "| outputs | instruction | 2 | 0.6000 | 1.71 |" in diversity
    assert "| not_new | 0.9 | 0 | 100.0% |" in diversity
    assert "| refusal | on | 0 | 100.0% |" in diversity
    assert "Share of the checked rows passing each check" in html
    assert "| input_rows_read | 6 |" in markdown_section(markdown, "Run")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html

    written = write_report(output)
    assert written == [f"s3://{local_s3.bucket}/runs/handmade/_report/report.html",
                       f"s3://{local_s3.bucket}/runs/handmade/_report/report.md"]
    keys = local_s3.client().list_objects_v2(Bucket=local_s3.bucket, Prefix="runs/handmade/")
    names = {item["Key"] for item in keys["Contents"]}
    assert {"runs/handmade/_report/report.html", "runs/handmade/_report/report.md"} <= names
    body = output.fs.open_input_stream(f"{output.path}/_report/report.md").read().decode()
    assert body.startswith("# augment-ray report: handmade")
    assert output.fs.type_name == "py::s3+retrying-reads"  # S3 behind the read retries


def test_counts_of_a_local_handmade_output(tmp_path):
    import pyarrow.fs as pafs

    handmade_output(pafs.LocalFileSystem(), str(tmp_path / "run"))
    report = build_report(Location(str(tmp_path / "run")), whitespace_counter("test"), limit=3)
    assert "kept rows 3 of 4" in report.markdown  # the sample is capped, and says so
    assert "at most 3 rows per side" in report.markdown
    assert report.html.count("<svg") >= 5
