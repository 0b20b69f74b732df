"""Global dedup at scale: augment_ray's dedup_exact / dedup_near vs single-process baselines.

Builds an N-row dataset from the real rows in ../shared/data (GSM8K, Self-Instruct seeds,
MT-Bench): distinct base rows made of 2-4 real sentences, then planted exact copies (identical,
case or whitespace changes) and planted near-duplicates (one word substituted, deleted or
inserted, two adjacent words swapped, or two sentences swapped; half also change case/spacing).
Every plant knows its parent, so the truth is known. Row ids are random, so the kept row of a
cluster (the lowest id) is not always the original.

Runs, on the same Parquet files in one run:
  ours_exact / ours_near   `augment-ray run` (the real CLI: read -> step -> write, local Ray on
                           every CPU) with one dedup step; rows/s over the whole run; peak RSS of
                           the driver and of the largest Ray worker (sampled every 0.2 s)
  pyarrow_exact            one process: read, the same folding with pyarrow.compute, group_by
  datasketch_near          one process: datasketch MinHash (same char 5-grams of the same folded
                           text, 128 perms) + MinHashLSH(threshold) insert and query, union-find
and prints one JSON object with rows/s, ratios (ours / baseline), and quality:
  vs the planted truth     precision = removed rows whose kept row is in their true cluster /
                           removed; recall = those / (rows that should go). A near plant whose
                           exact Jaccard with its parent is below the threshold is its own
                           cluster (counted as "borderline").
  vs exact Jaccard         a sample of removed rows: share whose exact Jaccard with the kept row
                           is >= threshold; a sample of true pairs (Jaccard >= threshold): share
                           that ended in one cluster.
`--scales 100000,1000000` runs ours at each size to show driver memory staying flat.

Usage: python benchmarks/dedup.py [--rows 1000000] [--scales 100000] [--no-baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections import defaultdict
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
THRESHOLD = 0.8
SHINGLE = 5
FILES = 16


# ------------------------------------------------------------------ data


def real_texts() -> list[str]:
    """GSM8K questions, Self-Instruct seed instructions and MT-Bench turns from ../shared/data."""
    texts = []
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        with (DATA / name).open() as handle:
            texts += [json.loads(line)["question"] for line in handle]
    with (DATA / "self_instruct_seed_tasks.jsonl").open() as handle:
        texts += [json.loads(line)["instruction"] for line in handle]
    with (DATA / "mt_bench_questions.jsonl").open() as handle:
        texts += [turn for line in handle for turn in json.loads(line)["turns"]]
    return texts


def real_sentences() -> list[str]:
    sentences = {s.strip() for t in real_texts() for s in re.split(r"(?<=[.?!])\s+", t)}
    return sorted(s for s in sentences if len(s.split()) >= 4)


def fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str) -> set[str]:
    return {text[i:i + SHINGLE] for i in range(max(len(text) - SHINGLE + 1, 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(fold(a)), shingles(fold(b))
    return len(x & y) / len(x | y)


def restyle(text: str, rng: random.Random) -> str:
    choice = rng.randrange(3)
    if choice == 0:
        return text.upper()
    if choice == 1:
        return "  ".join(text.split(" "))
    return "\t" + text.replace(". ", ".\n") + "  "


def near_variant(text: str, vocab: list[str], rng: random.Random) -> tuple[str, str]:
    words = text.split(" ")
    op = rng.choice(["substitute", "delete", "insert", "swap_words", "swap_sentences"])
    sentences = re.split(r"(?<=[.?!]) ", text)
    if op == "swap_sentences" and len(sentences) >= 2:
        i = rng.randrange(len(sentences) - 1)
        sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
        out = " ".join(sentences)
    else:
        op = "substitute" if op == "swap_sentences" else op
        i = rng.randrange(len(words))
        if op == "substitute":
            words[i] = rng.choice(vocab)
        elif op == "delete" and len(words) > 3:
            del words[i]
        elif op == "insert":
            words.insert(i, rng.choice(vocab))
        elif op == "swap_words" and len(words) > 1:
            i = min(i, len(words) - 2)
            words[i], words[i + 1] = words[i + 1], words[i]
        out = " ".join(words)
    if rng.random() < 0.5:
        out = restyle(out, rng)
    return out, op


def build_dataset(n: int, folder: Path, seed: int = 0) -> dict:
    """Writes FILES Parquet shards; returns the truth (cluster per id) and plant counts."""
    rng = random.Random(seed)
    sentences = real_sentences()
    vocab = sorted({w for s in sentences for w in s.split() if w.isalpha()})
    n_exact, n_near = n // 10, n // 4
    n_base = n - n_exact - n_near
    bases: list[str] = []
    seen: set[str] = set()
    while len(bases) < n_base:
        text = " ".join(rng.sample(sentences, rng.randint(2, 4)))
        key = fold(text)
        if key not in seen:
            seen.add(key)
            bases.append(text)
    texts = list(bases)
    parent = list(range(n_base))
    ops: dict[str, int] = defaultdict(int)
    for _ in range(n_exact):
        p = rng.randrange(n_base)
        texts.append(bases[p] if rng.random() < 1 / 3 else restyle(bases[p], rng))
        parent.append(p)
    for _ in range(n_near):
        p = rng.randrange(n_base)
        text, op = near_variant(bases[p], vocab, rng)
        ops[op] += 1
        texts.append(text)
        parent.append(p)
    ids = [f"r{i:08d}" for i in rng.sample(range(n * 10), n)]
    # truth for near dedup: a plant below the threshold is its own cluster
    near_cluster = list(parent)
    borderline = 0
    for i in range(n_base + n_exact, n):
        if jaccard(texts[i], bases[parent[i]]) < THRESHOLD:
            near_cluster[i] = n + i
            borderline += 1
    # truth for exact dedup: equal folded text
    exact_cluster: dict[str, int] = {}
    exact_truth = [exact_cluster.setdefault(fold(t), i) for i, t in enumerate(texts)]
    order = list(range(n))
    rng.shuffle(order)
    folder.mkdir(parents=True)
    per_file = -(-n // FILES)
    for f in range(FILES):
        rows = order[f * per_file:(f + 1) * per_file]
        pq.write_table(pa.table({"row_id": [ids[i] for i in rows],
                                 "instruction": [texts[i] for i in rows]}),
                       folder / f"part-{f:05d}.parquet")
    return {
        "ids": ids, "texts": texts, "near_truth": near_cluster, "exact_truth": exact_truth,
        "plants": {"base": n_base, "exact": n_exact, "near": n_near, "near_ops": dict(ops),
                   "near_below_threshold": borderline},
    }


# ------------------------------------------------------------------ quality


def score(keeper_of: dict[str, str], ids: list[str], truth: list[int]) -> dict:
    """keeper_of: removed id -> kept id."""
    cluster = {row_id: truth[i] for i, row_id in enumerate(ids)}
    sizes: dict[int, int] = defaultdict(int)
    for c in truth:
        sizes[c] += 1
    should_go = sum(s - 1 for s in sizes.values())
    right = sum(1 for r, k in keeper_of.items() if cluster[r] == cluster[k])
    return {"removed": len(keeper_of), "should_remove": should_go,
            "precision": round(right / len(keeper_of), 5) if keeper_of else 1.0,
            "recall": round(right / should_go, 5) if should_go else 1.0}


def jaccard_checks(keeper_of: dict[str, str], data: dict, sample: int, rng: random.Random) -> dict:
    text = dict(zip(data["ids"], data["texts"], strict=True))
    removed = rng.sample(sorted(keeper_of), min(sample, len(keeper_of)))
    direct = [jaccard(text[r], text[keeper_of[r]]) for r in removed]
    root = {r: keeper_of.get(r, r) for r in data["ids"]}
    n = len(data["ids"])
    plants = [i for i in range(n - data["plants"]["near"], n)
              if data["near_truth"][i] < n]  # near plants at or above the threshold
    pairs = rng.sample(plants, min(sample, len(plants)))
    base_ids = data["ids"]
    together = [root[base_ids[i]] == root[base_ids[data["near_truth"][i]]] for i in pairs]
    return {"removed_sampled": len(removed),
            "removed_with_jaccard_to_kept_ge_threshold": round(
                sum(j >= THRESHOLD for j in direct) / len(direct), 5) if direct else None,
            "true_pairs_sampled": len(pairs),
            "true_pairs_in_one_cluster": round(sum(together) / len(together), 5)
            if together else None}


# ------------------------------------------------------------------ runs


class PeakRss:
    """Samples the RSS of a process and its descendants (the local Ray it starts)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.driver = 0
        self.worker = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, self.root.memory_info().rss)
                for child in self.root.children(recursive=True):
                    try:
                        if "ray::" in child.name() or "default_worker" in " ".join(
                                child.cmdline()):
                            self.worker = max(self.worker, child.memory_info().rss)
                    except psutil.Error:
                        continue
            except psutil.Error:
                pass
            time.sleep(0.2)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"driver_peak_rss_mib": round(self.driver / 2**20, 1),
                "worker_peak_rss_mib": round(self.worker / 2**20, 1)}


def run_ours(step: dict, source: Path, out: Path, rows: int) -> tuple[dict, dict[str, str]]:
    job = {"name": "bench-dedup", "input": {"uri": str(source), "columns": {"id": "row_id"}},
           "output": {"uri": str(out), "mode": "overwrite"}, "steps": [step]}
    job_file = out.parent / f"{step['kind']}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    cli = Path(sys.executable).parent / "augment-ray"
    start = time.perf_counter()
    process = subprocess.Popen([str(cli), "run", str(job_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    rss = PeakRss(process.pid)
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    memory = rss.close()
    if process.returncode:
        raise SystemExit(f"augment-ray run failed:\n{output[-3000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    column = f"{step['kind']}_duplicate_of"
    rejects = pq.read_table(out / "_rejects", columns=["id", column])
    keeper_of = dict(zip(rejects["id"].to_pylist(), rejects[column].to_pylist(), strict=True))
    step_stats = summary["steps"][-1]
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            **memory, "step": {k: v for k, v in step_stats.items()
                               if k not in ("columns", "normalize")}}, keeper_of


def pyarrow_exact(source: Path) -> tuple[float, int]:
    start = time.perf_counter()
    table = pq.read_table(source)
    text = pc.utf8_normalize(table["instruction"], form="NFKC")
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(text), r"\s+", " "))
    groups = pa.table({"key": text, "id": table["row_id"]}).group_by("key").aggregate(
        [("id", "min")])
    removed = table.num_rows - groups.num_rows
    return time.perf_counter() - start, removed


def datasketch_near(source: Path) -> tuple[float, dict[str, str]]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    table = pq.read_table(source)
    ids = table["row_id"].to_pylist()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    hashes = []
    for row_id, text in zip(ids, table["instruction"].to_pylist(), strict=True):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode("utf-8") for s in shingles(fold(text))])
        lsh.insert(row_id, m)
        hashes.append(m)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for row_id, m in zip(ids, hashes, strict=True):
        for other in lsh.query(m):
            a, b = find(row_id), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    keeper_of = {r: find(r) for r in ids if find(r) != r}
    return time.perf_counter() - start, keeper_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scales", default="100000",
                        help="extra, smaller sizes to run ours at (memory flatness)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="augment_ray_bench_dedup_"))
    rng = random.Random(1)
    result: dict = {"machine": {"cpus": os.cpu_count(),
                                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                    "threshold": THRESHOLD, "shingle": f"char {SHINGLE}-grams", "runs": {}}
    sizes = sorted({int(s) for s in args.scales.split(",") if s} | {args.rows})
    near_step = {"kind": "dedup_near", "columns": ["instruction"], "threshold": THRESHOLD}
    exact_step = {"kind": "dedup_exact", "columns": ["instruction"]}
    try:
        for size in sizes:
            start = time.perf_counter()
            data = build_dataset(size, work / f"in-{size}")
            source = work / f"in-{size}"
            run: dict = {"plants": data["plants"],
                         "build_s": round(time.perf_counter() - start, 1)}
            print(f"[bench] {size} rows built in {run['build_s']}s", file=sys.stderr)
            exact, exact_keep = run_ours(exact_step, source, work / f"out-exact-{size}", size)
            exact["quality"] = score(exact_keep, data["ids"], data["exact_truth"])
            print(f"[bench] ours exact {exact['wall_s']}s", file=sys.stderr)
            near, near_keep = run_ours(near_step, source, work / f"out-near-{size}", size)
            near["quality"] = score(near_keep, data["ids"], data["near_truth"])
            near["quality_vs_exact_jaccard"] = jaccard_checks(near_keep, data, args.sample, rng)
            print(f"[bench] ours near {near['wall_s']}s", file=sys.stderr)
            run.update({"ours_exact": exact, "ours_near": near})
            if size == args.rows and not args.no_baselines:
                seconds, removed = pyarrow_exact(source)
                run["pyarrow_exact"] = {"wall_s": round(seconds, 2),
                                        "rows_per_s": round(size / seconds, 1),
                                        "removed": removed}
                print(f"[bench] pyarrow exact {seconds:.1f}s", file=sys.stderr)
                seconds, ds_keep = datasketch_near(source)
                run["datasketch_near"] = {
                    "wall_s": round(seconds, 2), "rows_per_s": round(size / seconds, 1),
                    "quality": score(ds_keep, data["ids"], data["near_truth"]),
                    "quality_vs_exact_jaccard": jaccard_checks(ds_keep, data, args.sample, rng)}
                print(f"[bench] datasketch near {seconds:.1f}s", file=sys.stderr)
                run["ratios"] = {
                    "ours_exact_vs_pyarrow_rows_per_s": round(
                        exact["rows_per_s"] / run["pyarrow_exact"]["rows_per_s"], 3),
                    "ours_near_vs_datasketch_rows_per_s": round(
                        near["rows_per_s"] / run["datasketch_near"]["rows_per_s"], 3)}
            result["runs"][str(size)] = run
            del data
        if len(sizes) > 1:
            small, large = result["runs"][str(sizes[0])], result["runs"][str(sizes[-1])]
            result["driver_rss_growth"] = {
                kind: round(large[kind]["driver_peak_rss_mib"]
                            / small[kind]["driver_peak_rss_mib"], 3)
                for kind in ("ours_exact", "ours_near")}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
