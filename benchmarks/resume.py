"""Reliability costs and savings, measured in one run on this machine.

commit    a 100-shard job (a filter step over real GSM8K rows) three ways, in one process on
          one local Ray, each repeated and the fastest taken:
            ours      run_job: staging prefix, read ledger, accounting (every written id read
                      back), reject-share check, move into data/, manifest, summary, _SUCCESS
            bare      the same Ray Data pipeline (read -> filter step -> write_parquet to a
                      folder) with none of the protocol
            pyarrow   one process: read every shard, the same length filter, write one file
          and prints ours/bare (the protocol's overhead) and ours/pyarrow.
resume    the real CLI on a refine job (bundled model): an uninterrupted run; a second run
          SIGKILLed (driver and its Ray, one process group) once --kill-at of its answers are
          journaled; the rerun. Prints walls, answers replayed vs generated, and rerun/whole.

Usage: python benchmarks/resume.py [--shards 100] [--rows-per-shard 2000] [--refine-rows 96]
                                   [--kill-at 0.5] [--only commit|resume]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
SEEDS = ROOT / "jobs" / "data" / "self_instruct_seed"
MAX_CHARS = 400


def make_shards(folder: Path, shards: int, rows: int) -> int:
    source = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True)
    n = 0
    for k in range(shards):
        batch = [source[(k * rows + i) % len(source)] for i in range(rows)]
        pq.write_table(pa.table({
            "instruction": [f"{r['question']} (variant {k}-{i})" for i, r in enumerate(batch)],
            "output": [r["answer"] for r in batch],
        }), folder / f"part-{k:04d}.parquet")
        n += rows
    return n


def commit_benchmark(shards: int, rows: int, repeats: int) -> dict:
    import ray

    from augment_ray.config.job import parse_job
    from augment_ray.io.read import list_input_shards
    from augment_ray.kinds import build_steps
    from augment_ray.pipeline import read_dataset, run_job

    work = Path(tempfile.mkdtemp(prefix="bench-commit-"))
    total = make_shards(work / "in", shards, rows)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = {"input": {"uri": str(work / "in")}, "output": {"uri": "", "mode": "overwrite"},
            "reliability": {"max_reject_share": 1.0},
            "steps": [{"kind": "filter", "max_chars": MAX_CHARS}]}
    times: dict[str, list[float]] = {"ours": [], "bare": [], "pyarrow": []}
    for attempt in range(repeats):
        spec["output"]["uri"] = str(work / f"ours-{attempt}")
        job = parse_job(spec)
        started = time.perf_counter()
        summary = run_job(job)
        times["ours"].append(time.perf_counter() - started)

        started = time.perf_counter()
        ds = read_dataset(job.input, list_input_shards(job.input))
        for step in build_steps(job):
            ds = step.apply(ds)
        ds.write_parquet(str(work / f"bare-{attempt}"))
        times["bare"].append(time.perf_counter() - started)

        started = time.perf_counter()
        tables = [pq.read_table(f) for f in sorted((work / "in").glob("*.parquet"))]
        table = pa.concat_tables(tables)
        long = pc.greater(pc.utf8_length(table["instruction"]), MAX_CHARS)
        out = work / f"pyarrow-{attempt}"
        out.mkdir()
        pq.write_table(table.filter(pc.invert(long)), out / "part.parquet")
        pq.write_table(table.filter(long), out / "rejects.parquet")
        times["pyarrow"].append(time.perf_counter() - started)
    ray.shutdown()
    best = {name: min(values) for name, values in times.items()}
    return {
        "shards": shards, "rows": total, "repeats": repeats,
        "rows_out": summary["rows_out"], "rows_rejected": summary["rows_rejected"],
        "output_files": summary["output"]["files"] + summary["output"]["reject_files"],
        "seconds": {name: round(value, 2) for name, value in best.items()},
        "all_seconds": {name: [round(v, 2) for v in values] for name, values in times.items()},
        "protocol_overhead_s": round(best["ours"] - best["bare"], 2),
        "ratio_ours_to_bare": round(best["ours"] / best["bare"], 3),
        "ratio_ours_to_pyarrow": round(best["ours"] / best["pyarrow"], 3),
    }


def refine_job(source: Path, output: Path) -> dict:
    return {
        "name": "resume-bench",
        "input": {"uri": str(source)},
        "output": {"uri": str(output)},
        "engines": {"m": {"batch_size": 4, "replicas": 1, "num_cpus": 1, "threads": 1,
                          "sampling": {"max_tokens": 32}}},
        "steps": [{"kind": "refine", "engine": "m"}],
    }


def journaled(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("[!.]*.parquet"))


def cli_run(job_file: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def resume_benchmark(rows: int, kill_at: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    table = pq.read_table(SEEDS).slice(0, rows)
    (work / "in").mkdir()
    for k in range(4):
        pq.write_table(table.slice(k * (-(-rows // 4)), -(-rows // 4)),
                       work / "in" / f"part-{k}.parquet")
    files = {}
    for name in ("whole", "killed"):
        files[name] = work / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(refine_job(work / "in", work / name)))

    started = time.perf_counter()
    whole = cli_run(files["whole"])
    out, _ = whole.communicate()
    whole_s = time.perf_counter() - started
    if whole.returncode:
        raise SystemExit(out[-3000:])

    started = time.perf_counter()
    killed = cli_run(files["killed"])
    journal = work / "killed" / "_work" / "refine"
    while journaled(journal) < kill_at * rows:
        if killed.poll() is not None:
            raise SystemExit("the run finished before it could be killed")
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    killed_s = time.perf_counter() - started
    answers_before_kill = journaled(journal)

    started = time.perf_counter()
    rerun = cli_run(files["killed"])
    out, _ = rerun.communicate()
    rerun_s = time.perf_counter() - started
    if rerun.returncode:
        raise SystemExit(out[-3000:])
    summary = json.loads((work / "killed" / "_summary.json").read_text())

    def rows_of(name: str) -> dict:
        parts = sorted((work / name / "data").glob("*.parquet"))
        return {r["id"]: r["refined_instruction"] for r in
                pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()}

    same = rows_of("whole") == rows_of("killed")
    counts = summary["journal"]["refine"]
    return {
        "rows": rows, "kill_at": kill_at,
        "uninterrupted_s": round(whole_s, 1),
        "killed_after_s": round(killed_s, 1),
        "rerun_s": round(rerun_s, 1),
        "answers_journaled_before_kill": answers_before_kill,
        "rerun_replayed": counts["replayed"], "rerun_generated": counts["generated"],
        "share_of_model_work_skipped": round(counts["replayed"] / rows, 3),
        "ratio_rerun_to_uninterrupted": round(rerun_s / whole_s, 3),
        "output_identical_to_uninterrupted": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--refine-rows", type=int, default=96)
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--only", choices=["commit", "resume"])
    args = parser.parse_args()
    result = {}
    if args.only in (None, "commit"):
        result["commit"] = commit_benchmark(args.shards, args.rows_per_shard, args.repeats)
    if args.only in (None, "resume"):
        result["resume"] = resume_benchmark(args.refine_rows, args.kill_at)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
