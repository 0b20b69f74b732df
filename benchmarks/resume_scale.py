"""Resume at scale: what replaying a large journal costs in memory and time, in one run.

micro   N answers (~1 KB text each) journaled as an attempt leaves them (one file per engine
        call of --call rows), then, each in a fresh process with its own local Ray: the driver
        opens the journal and a fresh Ray actor (as an engine actor does) looks up every key in
        calls of --call, in the order they were journaled (a rerun asks in about that order).
        Three ways, on the same files:
          empty   an uninterrupted run's actor: an empty journal, every lookup a miss, every
                  call's answers journaled (one file per call, as the engine pool does)
          old     the previous design (augment_ray/io/journal.py at OLD_DESIGN, from git): every
                  answer in one object-store table, a Python dict over all keys per actor
          new     this design: compaction + the hash index, row groups read on demand
        Peak RSS (VmHWM) of the actor and of the driver, open and lookup times; for `new` also
        the compaction, and calls of random keys (the worst order) timed apart after the peak.
e2e     the CLI on refine -> dedup_exact over --rows rows against an instant OpenAI-compatible
        endpoint served from this process: uninterrupted; a second run SIGKILLed (driver and its
        Ray, one process group) once --kill-at of the answers are journaled; the rerun. Walls,
        replayed share, peak RSS of the engine actors and of the driver (sampled every 0.5 s),
        and whether the rerun's output equals the uninterrupted one.

Usage: python benchmarks/resume_scale.py --only micro --answers 500000,1000000
       python benchmarks/resume_scale.py --only e2e --rows 200000
Writes the JSON to --out (default benchmarks/results/resume-scale-<part>.json) and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
SAMPLING = '{"max_tokens": 256}'
ANSWER_CHARS = 1000


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the process's peak resident set, as the kernel counts it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def corpus(chars: int = 8_000_000) -> str:
    """Word salad to cut answers from: as incompressible as prose, cheap to make."""
    rng = np.random.default_rng(0)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 10)))
             for _ in range(5000)]
    picks = rng.integers(0, len(words), chars // 5)
    return " ".join(words[i] for i in picks)[:chars]


def answer_text(text: str, seed: bytes) -> str:
    start = int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % (len(text) - ANSWER_CHARS)
    return text[start:start + ANSWER_CHARS]


def key(n: int) -> str:
    from augment_ray.io.journal import request_key

    return request_key(f'[{{"role": "user", "content": "question {n}"}}]', SAMPLING, "0")


# ---- micro: replay of N journaled answers --------------------------------------------------------

def synthesize(folder: Path, answers: int, call: int) -> dict:
    """What a killed attempt leaves: one journal file per engine call of `call` answers."""
    from augment_ray.engines.base import Completion
    from augment_ray.io.journal import GenerationJournal
    from augment_ray.storage import location

    started = time.perf_counter()
    text = corpus()
    journal = GenerationJournal(location(str(folder), None), "earlier")
    for start in range(0, answers, call):
        numbers = range(start, min(start + call, answers))
        journal.record([key(n) for n in numbers],
                       [Completion(answer_text(text, str(n).encode()), 40, 250, "stop")
                        for n in numbers])
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"files": len(list(folder.iterdir())), "bytes": size,
            "seconds": round(time.perf_counter() - started, 1)}


# the last commit whose journal loaded every earlier answer into every actor
OLD_DESIGN = "4cf3ffb"


def old_module(target: Path) -> Path:
    """The journal.py of OLD_DESIGN as a module of its own (the design before this one)."""
    source = subprocess.run(["git", "show", f"{OLD_DESIGN}:augment_ray/io/journal.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = target / "old_journal.py"
    path.write_text(source)
    return path


def load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("old_journal", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_journal"] = module
    spec.loader.exec_module(module)
    return module


def make_replayer() -> Any:
    import ray

    from augment_ray.engines.base import Completion

    @ray.remote(num_cpus=1)
    class Replayer:
        """Does what an engine actor does with the journal: one lookup per engine call."""

        def replay(self, design: str, journal: list, answers: int, call: int, old: str,
                   random_calls: int) -> dict:
            started = time.perf_counter()
            if design == "old":
                index = load_module(old)._index(journal[0], "completion")
            else:
                index = journal[0].answers()
            hits = 0
            text = corpus(1 << 16)
            for start in range(0, answers, call):
                keys = [key(n) for n in range(start, min(start + call, answers))]
                found = index.get_many(keys)
                hits += sum(value is not None for value in found)
                if design == "empty":  # as uninterrupted: every answer is new, journaled
                    journal[0].record(keys, [Completion(answer_text(text, k.encode()), 40, 250,
                                                        "stop") for k in keys])
            result = {"hits": hits, "lookup_s": round(time.perf_counter() - started, 1),
                      "actor_peak_rss_mb": peak_rss_mb()}
            if random_calls:
                rng = np.random.default_rng(1)
                started = time.perf_counter()
                for _ in range(random_calls):
                    index.get_many([key(int(n)) for n in rng.integers(0, answers, call)])
                result["random_order_s_per_call"] = round(
                    (time.perf_counter() - started) / random_calls, 3)
                result["actor_peak_rss_mb_after_random"] = peak_rss_mb()
            return result

    return Replayer


def measure(design: str, folder: str, answers: int, call: int, old: str, ray_tmp: str,
            random_calls: int) -> dict:
    """One design in this (fresh) process: the driver's open, then one actor's lookups."""
    import ray

    from augment_ray.io.journal import GenerationJournal
    from augment_ray.storage import location

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _temp_dir=ray_tmp)
    work = location(str(Path(folder).parent), None)
    pool = Path(folder).name
    before = peak_rss_mb()
    started = time.perf_counter()
    if design == "empty":  # its answers go to a folder of their own, deleted after
        journal: Any = GenerationJournal.open(work, f"{pool}-uninterrupted", "run2")
    elif design == "old":
        journal = load_module(old).GenerationJournal.open(work, pool, "run2")
    else:
        journal = GenerationJournal.open(work, pool, "run2")
    opened = time.perf_counter() - started
    driver_after_open = peak_rss_mb()
    ref = journal.earlier if design == "old" else journal
    replayer = make_replayer().remote()
    result = ray.get(replayer.replay.remote(design, [ref], answers, call, old,
                                            random_calls if design == "new" else 0))
    ray.shutdown()
    shutil.rmtree(Path(folder).parent / f"{pool}-uninterrupted", ignore_errors=True)
    files = sorted(p.name for p in Path(folder).iterdir()) if design == "new" else []
    return {"design": design, "open_s": round(opened, 1), "earlier": journal.earlier_count,
            "driver_peak_rss_mb_before_open": before,
            "driver_peak_rss_mb": max(driver_after_open, peak_rss_mb()),
            **result, **({"files_after_open": len(files)} if files else {})}


def micro(answers: int, call: int, random_calls: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="rsc-", dir="/tmp"))
    try:
        folder = base / "_work" / "refine"
        made = synthesize(folder, answers, call)
        old = old_module(base)
        runs = {}
        for design in ("empty", "old", "new"):  # `new` last: it compacts the files
            command = [sys.executable, __file__, "--measure", design, "--folder", str(folder),
                       "--answers", str(answers), "--call", str(call), "--old", str(old),
                       "--ray-tmp", str(base / "ray"), "--random-calls", str(random_calls)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            runs[design] = json.loads(done.stdout.strip().splitlines()[-1])
        empty = runs["empty"]["actor_peak_rss_mb"]
        return {"answers": answers, "call": call, "journal_files": made["files"],
                "journal_bytes": made["bytes"], "synthesize_s": made["seconds"],
                **runs, "actor_rss_new_over_uninterrupted": round(
                    runs["new"]["actor_peak_rss_mb"] / empty, 3),
                "actor_rss_old_over_uninterrupted": round(
                    runs["old"]["actor_peak_rss_mb"] / empty, 3)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- e2e: the CLI killed at half and rerun ------------------------------------------------------

class InstantServer:
    """An OpenAI-compatible /v1/chat/completions answering at once, the same text for the
    same request (so a rerun's fresh answers equal the uninterrupted run's)."""

    def __init__(self) -> None:
        text = corpus()
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                seed = json.dumps([body.get("messages"), body.get("seed")]).encode()
                reply = json.dumps({
                    "choices": [{"message": {"role": "assistant",
                                             "content": answer_text(text, seed)},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 250}}).encode()
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_input(folder: Path, rows: int, shards: int) -> None:
    source = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()
              if line.strip()]
    folder.mkdir(parents=True)
    per = -(-rows // shards)
    for k in range(shards):
        numbers = range(k * per, min((k + 1) * per, rows))
        pq.write_table(pa.table({"instruction": [f"{source[n % len(source)]} (variant {n})"
                                                 for n in numbers]}),
                       folder / f"part-{k:04d}.parquet")


def e2e_job(source: Path, output: Path, base_url: str) -> dict:
    return {
        "name": "resume-scale",
        "input": {"uri": str(source)},
        "output": {"uri": str(output)},
        "engines": {"api": {"kind": "openai", "base_url": base_url, "model": "instant",
                            "replicas": 2, "batch_size": 32, "max_concurrency": 16,
                            "sampling": {"max_tokens": 256}}},
        "steps": [{"kind": "refine", "engine": "api", "checks": False},
                  {"kind": "dedup_exact"}],
    }


class Sampler:
    """Peak RSS of a CLI run's processes: the driver, the engine actors, the rest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, tuple[str, float]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stopped.wait(0.5):
            try:
                processes = [psutil.Process(self.pid), *psutil.Process(self.pid).children(
                    recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    title = " ".join(process.cmdline())[:200]
                except psutil.Error:
                    continue
                role = ("driver" if process.pid == self.pid else
                        "engine_actor" if "LLMTaskRunner" in title else "other")
                peak = peak_rss_mb(process.pid)
                if peak > self.peaks.get(process.pid, ("", 0.0))[1]:
                    self.peaks[process.pid] = (role, peak)

    def stop(self) -> dict:
        self.stopped.set()
        self.thread.join()
        by_role: dict[str, list[float]] = {}
        for role, peak in self.peaks.values():
            by_role.setdefault(role, []).append(peak)
        return {"driver_peak_rss_mb": max(by_role.get("driver", [0.0])),
                "engine_actor_peak_rss_mb": sorted(by_role.get("engine_actor", [])),
                "other_worker_peak_rss_mb_max": max(by_role.get("other", [0.0]))}


class JournalCount:
    """Answers journaled so far (each file's row count read once)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[str, int] = {}

    def __call__(self) -> int:
        if self.folder.exists():
            for path in self.folder.glob("[!.]*.parquet"):
                if path.name not in self.rows:
                    try:
                        self.rows[path.name] = pq.read_metadata(path).num_rows
                    except OSError:
                        continue
        return sum(self.rows.values())


def cli(job_file: Path, ray_tmp: Path) -> subprocess.Popen:
    ray_tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)


def timed_run(job_file: Path, ray_tmp: Path) -> dict:
    started = time.perf_counter()
    process = cli(job_file, ray_tmp)
    sampler = Sampler(process.pid)
    out, _ = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(out[-3000:])
    return {"wall_s": round(wall, 1), **sampler.stop()}


def killed_run(job_file: Path, ray_tmp: Path, journal: Path, answers: int) -> dict:
    started = time.perf_counter()
    process = cli(job_file, ray_tmp)
    sampler = Sampler(process.pid)
    count = JournalCount(journal)
    while count() < answers:
        if process.poll() is not None:
            raise SystemExit("the run finished before it could be killed")
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    return {"killed_after_s": round(time.perf_counter() - started, 1),
            "answers_journaled_before_kill": count(), **sampler.stop()}


def output_rows(folder: Path) -> dict[str, str]:
    table = pa.concat_tables([pq.read_table(p, columns=["id", "refined_instruction"])
                              for p in sorted((folder / "data").glob("*.parquet"))])
    return dict(zip(table["id"].to_pylist(), table["refined_instruction"].to_pylist(),
                    strict=True))


def phase(name: str, result: dict) -> dict:
    """Each phase's figures on stderr as it ends: a long run cut short keeps what it measured."""
    print(json.dumps({name: result}), file=sys.stderr, flush=True)
    return result


def e2e(rows: int, kill_at: float, shards: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="rse-", dir="/tmp"))
    server = InstantServer()
    try:
        make_input(base / "in", rows, shards)
        jobs = {}
        for name in ("whole", "killed"):
            jobs[name] = base / f"{name}.yaml"
            jobs[name].write_text(yaml.safe_dump(e2e_job(base / "in", base / name,
                                                         server.base_url)))
        whole = phase("uninterrupted", timed_run(jobs["whole"], base / "ray"))
        killed = phase("killed", killed_run(jobs["killed"], base / "ray",
                                            base / "killed" / "_work" / "refine",
                                            int(kill_at * rows)))
        rerun = phase("rerun", timed_run(jobs["killed"], base / "ray"))
        summary = json.loads((base / "killed" / "_summary.json").read_text())
        counts = summary["journal"]["refine"]
        return {
            "rows": rows, "shards": shards, "kill_at": kill_at,
            "uninterrupted": {**whole, "rows_per_s": round(rows / whole["wall_s"], 1)},
            "killed": killed, "rerun": rerun,
            "rerun_replayed": counts["replayed"], "rerun_generated": counts["generated"],
            "replayed_share": round(counts["replayed"] / rows, 3),
            "ratio_rerun_to_uninterrupted": round(rerun["wall_s"] / whole["wall_s"], 3),
            "actor_rss_rerun_over_uninterrupted": round(
                max(rerun["engine_actor_peak_rss_mb"]) /
                max(whole["engine_actor_peak_rss_mb"]), 3),
            "driver_rss_rerun_over_uninterrupted": round(
                rerun["driver_peak_rss_mb"] / whole["driver_peak_rss_mb"], 3),
            "output_identical_to_uninterrupted": output_rows(base / "whole") ==
            output_rows(base / "killed"),
            "server_requests": server.requests,
        }
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["micro", "e2e"])
    parser.add_argument("--answers", default="500000,1000000", help="micro: N, comma-separated")
    parser.add_argument("--call", type=int, default=128, help="micro: answers per engine call")
    parser.add_argument("--random-calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000, help="e2e rows")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    # one micro measurement in a fresh process (used by micro itself)
    parser.add_argument("--measure", choices=["empty", "old", "new"])
    parser.add_argument("--folder")
    parser.add_argument("--old")
    parser.add_argument("--ray-tmp")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, int(args.answers), args.call,
                                 args.old, args.ray_tmp, args.random_calls)))
        return
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs"}
    if args.only in (None, "micro"):
        result["micro"] = [micro(int(n), args.call, args.random_calls)
                           for n in args.answers.split(",")]
    if args.only in (None, "e2e"):
        result["e2e"] = e2e(args.rows, args.kill_at, args.shards)
    text = json.dumps(result, indent=2)
    out = args.out or ROOT / "benchmarks" / "results" / f"resume-scale-{args.only or 'all'}.json"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
