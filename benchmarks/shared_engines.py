"""One model copy for many steps: a refine -> respond -> score job on one engine, run through the
CLI with the engine shared (one pool, the default) and with `share: false` (a pool per step:
what every job did before), in the same run, for each engine kind asked for.

Per run: wall time (submission to commit, model loads included), the summary's model_loads,
and peak memory sampled every 0.25 s: the whole process tree of the CLI (driver, local Ray,
workers) and the engine actors alone (processes Ray titles with a runner's name). vLLM's KV cache
is allocated up front (gpu_memory_utilization of host memory on CPU), so its peak says how many
engines were up at once. Prints one JSON object.

  python benchmarks/shared_engines.py --engines transformers,vllm --rows 48 --max-tokens 32

Three runs per kind: `separate` (share: false, a pool of 1 per step: 3 model copies), `shared`
(1 replica: 1 copy) and, for --shared-replicas-3 kinds, `shared_3_replicas` (3 copies, each
serving every step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import yaml
from process_tree import read_tree

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
RUNNERS = ("SharedEngineRunner", "LLMTaskRunner", "ScoreRunner", "vLLMEngineStageUDF",
           "_MapWorker", "MapWorker(MapBatches(vLLM")

# small enough that three pools of one (share: false) fit beside the reads on 2 CPUs
ENGINES: dict[str, dict[str, Any]] = {
    "transformers": {"kind": "transformers", "model": "bundled", "replicas": 1,
                     "num_cpus": 0.3, "threads": 2, "batch_size": 16},
    "vllm": {"kind": "vllm", "model": "bundled", "device": "cpu", "num_cpus": 0.2,
             "gpu_memory_utilization": 0.1, "max_model_len": 1024, "batch_size": 16},
}


def job(kind: str, share: bool, replicas: int, source: Path, output: Path, max_tokens: int
        ) -> dict[str, Any]:
    engine = {**ENGINES[kind], "share": share, "replicas": replicas,
              "sampling": {"temperature": 0.0, "max_tokens": max_tokens}}
    return {
        "name": f"shared-engines-{kind}-{'shared' if share else 'separate'}-{replicas}",
        "input": {"uri": str(source)},
        "output": {"uri": str(output), "mode": "overwrite"},
        "engines": {"teacher": engine},
        "steps": [
            {"kind": "refine", "engine": "teacher", "checks": False},
            {"kind": "respond", "engine": "teacher", "checks": False,
             "reject_truncated": False},
            {"kind": "score", "engine": "teacher", "methods": ["p_yes"],
             "max_reject_share": 1.0},
        ],
    }


class PeakMemory(threading.Thread):
    """Peak RSS of a process tree and of its engine-actor processes, sampled."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root)
        self.tree = 0
        self.actors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            found = read_tree(self.root, lambda p: (p.memory_info().rss, " ".join(p.cmdline())))
            if found is None:
                break
            tree = sum(rss for rss, _ in found)
            actors = sum(rss for rss, title in found
                         if any(name in title for name in RUNNERS) and "IDLE" not in title)
            self.tree, self.actors = max(self.tree, tree), max(self.actors, actors)
            time.sleep(0.25)


def run_once(job_file: Path, output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "augment_ray.cli", "run", str(job_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    memory = PeakMemory(process.pid)
    memory.start()
    out, _ = process.communicate()
    seconds = time.perf_counter() - started
    memory.stop.set()
    memory.join()
    if process.returncode != 0:
        raise SystemExit(f"{job_file} failed:\n{out[-3000:]}")
    summary = json.loads((output / "_summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    # model_loads counts engine-pool actors; a step on ray.data.llm starts `replicas` engines of
    # its own, which its entry says (execution ray_data_llm) but model_loads does not count
    processor_engines = sum(s.get("replicas", 0) for s in summary["steps"]
                            if s.get("execution") == "ray_data_llm")
    return {
        "wall_s": round(seconds, 1),
        "model_loads": summary.get("model_loads"),
        "model_copies": sum((summary.get("model_loads") or {}).values()) + processor_engines,
        "peak_rss_tree_mb": round(memory.tree / 2**20),
        "peak_rss_engine_actors_mb": round(memory.actors / 2**20),
        "completion_tokens": sum(s.get("completion_tokens", 0) for s in summary["steps"]),
        "execution": {name: steps[name].get("execution") for name in ("refine", "respond")
                      if steps[name].get("execution")},
        "rows_out": summary["rows_out"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shared-replicas-3", default="transformers",
                        help="engine kinds also run shared with 3 replicas (3 model copies)")
    args = parser.parse_args()

    results: dict[str, Any] = {"rows": args.rows, "max_tokens": args.max_tokens,
                               "steps": "refine -> respond -> score (p_yes)",
                               "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in"
        source.mkdir()
        pq.write_table(pq.read_table(SAMPLE).slice(0, args.rows), source / "part-0.parquet")
        for kind in args.engines.split(","):
            entry: dict[str, Any] = {}
            # today's pool per step (3 copies of the model); one shared pool of 1 replica (1
            # copy); one shared pool of 3 replicas (as many copies as today, each serving all)
            runs = [("separate", False, 1), ("shared", True, 1)]
            if kind in args.shared_replicas_3.split(","):
                runs.append(("shared_3_replicas", True, 3))
            for name, share, replicas in runs:
                output = Path(tmp) / f"{kind}-{name}"
                job_file = Path(tmp) / f"{kind}-{name}.yaml"
                job_file.write_text(yaml.safe_dump(job(kind, share, replicas, source, output,
                                                       args.max_tokens)))
                entry[name] = run_once(job_file, output)
                print(f"{kind} {name}: {entry[name]}", file=sys.stderr)
            shared, separate = entry["shared"], entry["separate"]
            entry["wall_ratio_shared_vs_separate"] = round(shared["wall_s"] / separate["wall_s"], 3)
            entry["peak_tree_ratio"] = round(
                shared["peak_rss_tree_mb"] / separate["peak_rss_tree_mb"], 3)
            entry["peak_actor_ratio"] = round(
                shared["peak_rss_engine_actors_mb"] / max(separate["peak_rss_engine_actors_mb"], 1),
                3)
            if "shared_3_replicas" in entry:
                entry["wall_ratio_shared_3_vs_separate"] = round(
                    entry["shared_3_replicas"]["wall_s"] / separate["wall_s"], 3)
            results[kind] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
