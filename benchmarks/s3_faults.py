"""Which share of failing S3 requests does a run survive?

A local S3 server (moto) behind tests/s3_faults.py's fault proxy. The input (--shards Parquet
shards of --rows-per-shard rows, with duplicates and rows the filter rejects) is put there
directly; every request of the job goes through the proxy, which fails the given share of each
kind of request (reads, writes, listings, copies, deletes, heads; the output lease's boto3
requests too): 40% 503 SlowDown, 30% 500 InternalError, 20% connection resets (half after the
server acted), 10% answers held 2 s past a 1 s storage.request_timeout_s. Whether a request
fails is fixed by (seed, operation, object, attempt).

For every share (--shares) and retry mode (standard, legacy), the job (filter -> dedup_exact,
max_rows_per_file 50) runs --seeds times in-process on one local Ray, with the default
storage.max_attempts (10): committed (exit as a success, _SUCCESS written), equal (data/ and
_rejects/ equal row for row to the fault-free run's), wall time / the fault-free run's (through
the proxy at share 0, median of two runs), and the error paragraph when it failed.

Baseline: raw pyarrow (a default S3FileSystem: its default retries, AwsStandardS3RetryStrategy
with 3 attempts, and default timeouts) reads every input shard with pq.read_table and writes it
back with pq.write_table through the same proxy, --baseline-seeds times per share: how many
of those passes finished with every file read and written intact.

Usage: python benchmarks/s3_faults.py [--shares 0.05,0.1,0.2,0.3,0.5] [--seeds 2]
       [--baseline-seeds 10] [--out benchmarks/results/s3-faults.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault proxy lives beside the tests

from s3_faults import FaultPlan, S3FaultProxy  # noqa: E402

BUCKET = "faults-bench"
REQUEST_TIMEOUT_S = 1.0
DELAY_S = 2.0
MAX_ROWS_PER_FILE = 50


def start_s3() -> tuple[Any, str]:
    """moto on 127.0.0.1 with dummy credentials (no IAM checks: the proxy is what is tested)."""
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY":
                       "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    return server, f"http://127.0.0.1:{port}"


def put_input(endpoint: str, shards: int, rows_per_shard: int) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    distinct = shards * rows_per_shard * 2 // 3
    for shard in range(shards):
        rows = []
        for i in range(rows_per_shard):
            n = shard * rows_per_shard + i
            rows.append({"id": f"row-{n:06d}",
                         "instruction": f"What is {n % distinct} plus {n % distinct + 1}?",
                         "output": "" if n % 11 == 0 else f"It is {2 * (n % distinct) + 1}."})
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        client.put_object(Bucket=BUCKET, Key=f"in/part-{shard:03d}.parquet",
                          Body=sink.getvalue())


def job(endpoint: str, name: str, mode: str) -> Any:
    from augment_ray.config.job import parse_job

    storage = {"endpoint": endpoint, "region": "us-east-1", "retry_mode": mode,
               "request_timeout_s": REQUEST_TIMEOUT_S, "connect_timeout_s": REQUEST_TIMEOUT_S}
    return parse_job({
        "name": "s3-faults-bench",
        "input": {"uri": f"s3://{BUCKET}/in/", "storage": storage},
        "output": {"uri": f"s3://{BUCKET}/out/{name}/", "mode": "overwrite",
                   "storage": storage, "max_rows_per_file": MAX_ROWS_PER_FILE},
        "steps": [{"kind": "filter"}, {"kind": "dedup_exact"}],
    })


def committed_rows(endpoint: str, name: str) -> dict[str, list[dict]] | None:
    """data/ and _rejects/ rows sorted by id, read past the proxy; None without _SUCCESS."""
    fs = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                           region="us-east-1")
    base = f"{BUCKET}/out/{name}"
    if fs.get_file_info(f"{base}/_SUCCESS").type != pafs.FileType.File:
        return None
    found = {}
    for folder in ("data", "_rejects"):
        listing = fs.get_file_info(pafs.FileSelector(f"{base}/{folder}", allow_not_found=True))
        rows = [row for item in listing if item.path.endswith(".parquet")
                for row in pq.read_table(item.path, filesystem=fs).to_pylist()]
        found[folder] = sorted(rows, key=lambda row: row["id"])
    return found


def run_once(proxy: S3FaultProxy, plan: FaultPlan, name: str, mode: str) -> dict[str, Any]:
    from augment_ray.errors import AugmentRayError
    from augment_ray.pipeline import run_job

    proxy.reset(plan)
    started = time.perf_counter()
    error = None
    try:
        run_job(job(proxy.url, name, mode))
    except AugmentRayError as failure:
        error = str(failure)
    seconds = time.perf_counter() - started
    requests = sum(proxy.counts.values())
    return {"seconds": round(seconds, 2), "error": error, "requests": requests,
            "failed_requests": proxy.failed(),
            "failed_by_operation": {op: proxy.failed(op)
                                    for op in sorted({op for op, _ in proxy.counts})}}


def raw_pyarrow_pass(proxy: S3FaultProxy, plan: FaultPlan, files: list[str],
                     expected: dict[str, pa.Table], seed: int) -> str | None:
    """Read every input file and write it back with a default S3FileSystem; None if all went
    through intact, else the first error."""
    proxy.reset(plan)
    fs = pafs.S3FileSystem(endpoint_override=proxy.url.removeprefix("http://"), scheme="http",
                           region="us-east-1")
    try:
        for path in files:
            table = pq.read_table(path, filesystem=fs)
            target = path.replace("/in/", f"/raw/{seed}/")
            pq.write_table(table, target, filesystem=fs)
            if not table.equals(expected[path]):
                return f"{path}: read back different rows"
    except (OSError, pa.ArrowException) as error:
        return str(error).splitlines()[0][:300]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shares", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--modes", default="standard,legacy")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--baseline-seeds", type=int, default=10)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=150)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/s3-faults.json"))
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    modes = args.modes.split(",")

    bench_started = time.perf_counter()
    server, endpoint = start_s3()
    put_input(endpoint, args.shards, args.rows_per_shard)
    proxy = S3FaultProxy(endpoint).start()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        baseline = [run_once(proxy, FaultPlan({}), f"clean-{i}", "standard") for i in range(2)]
        clean_seconds = statistics.median(run["seconds"] for run in baseline)
        reference = committed_rows(endpoint, "clean-0")
        assert reference is not None and all(run["error"] is None for run in baseline), baseline
        runs = []
        for share in shares:
            for mode in modes:
                for seed in range(1, args.seeds + 1):
                    plan = FaultPlan.everywhere(share, delay_s=DELAY_S, seed=seed)
                    name = f"s{share}-{mode}-{seed}"
                    run = run_once(proxy, plan, name, mode)
                    rows = committed_rows(endpoint, name)
                    run.update(share=share, mode=mode, seed=seed, committed=rows is not None,
                               equal=rows == reference,
                               time_ratio=round(run["seconds"] / clean_seconds, 2))
                    print(json.dumps(run), file=sys.stderr, flush=True)
                    runs.append(run)

        files = sorted(f"{BUCKET}/in/part-{shard:03d}.parquet" for shard in range(args.shards))
        direct = pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"),
                                   scheme="http", region="us-east-1")
        expected = {path: pq.read_table(path, filesystem=direct) for path in files}
        raw: dict[str, Any] = {}
        for share in shares:
            errors = [raw_pyarrow_pass(proxy, FaultPlan.everywhere(share, delay_s=DELAY_S,
                                                                   seed=seed), files, expected,
                                       seed)
                      for seed in range(1, args.baseline_seeds + 1)]
            raw[str(share)] = {"passes": len(errors),
                               "succeeded": sum(error is None for error in errors),
                               "first_error": next((e for e in errors if e), None)}
            print(json.dumps({"raw_pyarrow": share, **raw[str(share)]}), file=sys.stderr,
                  flush=True)
    finally:
        ray.shutdown()
        proxy.stop()
        server.stop()

    def survived(mode: str) -> float | None:
        ok = [share for share in shares if all(
            run["equal"] for run in runs if run["share"] == share and run["mode"] == mode)]
        return max(ok) if ok else None

    result = {
        "benchmark": "s3-faults",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "pyarrow": pa.__version__, "ray": ray.__version__},
        "input": {"shards": args.shards, "rows": args.shards * args.rows_per_shard,
                  "max_rows_per_file": MAX_ROWS_PER_FILE},
        "faults": {"kinds": dict(FaultPlan({}).kinds), "delay_s": DELAY_S,
                   "request_timeout_s": REQUEST_TIMEOUT_S, "max_attempts": 10},
        "fault_free_seconds": clean_seconds,
        "fault_free_requests": baseline[0]["requests"],
        "runs": runs,
        "highest_share_survived": {mode: survived(mode) for mode in modes},
        "raw_pyarrow": raw,
        "raw_pyarrow_highest_share_all_passes": max(
            [float(s) for s, r in raw.items() if r["succeeded"] == r["passes"]], default=None),
        "bench_seconds": round(time.perf_counter() - bench_started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
