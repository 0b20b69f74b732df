"""Semantic dedup: augment_ray's dedup_semantic vs dedup_near and a brute-force baseline.

Two measurements in one run, because embedding a million texts with MiniLM on 2 cores takes
hours (~100 texts/s) while the clustering and pair search is what has to scale:

text (--text-rows, real embeddings)
    Distinct rows are real texts from ../shared/data (GSM8K questions, Self-Instruct seed tasks,
    MT-Bench turns); a fifth of the rows are planted rewordings made by
    jobs/data/make_paraphrase_sample.py:paraphrase (synonyms, a leading clause moved to the end,
    a request frame), a fifth of those rewordings of rewordings. Every plant knows its source,
    so the truth is known; ids are random. Runs, on the same Parquet files:
      ours_semantic   `augment-ray run` with one dedup_semantic step (bundled MiniLM, one actor
                      on 1 CPU: what the CPU budget allows on 2 cores)
      ours_near       `augment-ray run` with one dedup_near step (MinHash, Jaccard 0.8)
      baseline        one process: SentenceTransformer.encode (2 threads) + numpy brute-force
                      cosine over every pair + union-find; also the threshold sweep
    Quality vs the planted truth (precision = removed rows whose kept row is in their true
    group / removed; recall = those / rows that should go), plants caught split by whether
    MinHash can see them (exact char 5-gram Jaccard to the source >= 0.8), and ours vs the
    baseline's exact pairs at the same threshold.
vectors (--vector-rows, default 1,000,000)
    Vectors built from the real embeddings above: each distinct row a random mix of two real
    vectors plus noise, a tenth planted near-copies at a cosine drawn from [0.91, 0.99]. Made in
    Ray tasks (in a process of its own), so the driver never holds them. Runs the step's barrier
    (`DedupSemanticStep.dedup_vectors`: k-means, assignment, shuffle, pairs, mark) on a local
    2-CPU Ray; rows/s, peak RSS. Quality: planted pairs found, and for --queries random rows
    every row of the million at cosine >= threshold (exact, by brute force in tasks) and whether
    it ended in the row's group. Baseline: numpy brute force on --brute-rows rows, its time
    scaled by (rows / brute_rows)^2 to the full size (stated as extrapolated).

Usage: python benchmarks/dedup_semantic.py [--text-rows 6000] [--vector-rows 1000000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import dedup as near_bench  # benchmarks/dedup.py: PeakRss, jaccard, score

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
THRESHOLD = 0.9
NEAR_THRESHOLD = 0.8
FILES = 4
SWEEP = (0.8, 0.85, 0.9, 0.95)
_spec = importlib.util.spec_from_file_location(
    "make_paraphrase_sample", ROOT / "jobs" / "data" / "make_paraphrase_sample.py")
_paraphrases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paraphrases)
paraphrase = _paraphrases.paraphrase


# ------------------------------------------------------------------ text data


def real_texts() -> list[str]:
    unique = {near_bench.fold(t): t for t in near_bench.real_texts()}
    return [unique[k] for k in sorted(unique)]


def build_texts(n: int, folder: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pool = real_texts()
    n_plants = n // 5
    n_base = min(n - n_plants, len(pool))
    n_plants = n - n_base
    texts = rng.sample(pool, n_base)
    truth = list(range(n_base))
    source = list(range(n_base))
    first = int(n_plants * 0.8)
    for p in range(n_plants):
        parent = rng.randrange(n_base) if p < first else n_base + rng.randrange(first)
        texts.append(paraphrase(texts[parent], rng))
        truth.append(truth[parent])
        source.append(parent)
    ids = [f"r{i:08d}" for i in rng.sample(range(n * 10), n)]
    visible = [near_bench.jaccard(texts[i], texts[source[i]]) >= NEAR_THRESHOLD
               for i in range(n_base, n)]
    order = list(range(n))
    rng.shuffle(order)
    folder.mkdir(parents=True)
    per_file = -(-n // FILES)
    for f in range(FILES):
        part = order[f * per_file:(f + 1) * per_file]
        pq.write_table(pa.table({"row_id": [ids[i] for i in part],
                                 "instruction": [texts[i] for i in part]}),
                       folder / f"part-{f:05d}.parquet")
    return {"ids": ids, "texts": texts, "truth": truth, "source": source, "base": n_base,
            "visible": visible,
            "plants": {"distinct": n_base, "rewordings": first, "rewordings_of_rewordings":
                       n_plants - first, "minhash_visible": sum(visible)}}


def roots(keeper_of: dict[str, str], ids: list[str]) -> list[str]:
    return [keeper_of.get(i, i) for i in ids]


def caught(keeper_of: dict[str, str], data: dict) -> dict:
    """Share of plants that ended in their source's group, split by MinHash visibility."""
    root = roots(keeper_of, data["ids"])
    hits = {True: [0, 0], False: [0, 0]}
    for k, visible in enumerate(data["visible"]):
        i = data["base"] + k
        hits[visible][0] += root[i] == root[data["source"][i]]
        hits[visible][1] += 1
    return {f"plants_{'minhash_visible' if v else 'minhash_invisible'}_caught":
            round(h / t, 4) if t else None for v, (h, t) in hits.items()}


def agreement(ours: dict[str, str], exact: dict[str, str]) -> dict:
    same = sum(1 for r, k in ours.items() if exact.get(r) == k)
    return {"removed_also_removed_by_brute_force_same_keeper": round(same / len(ours), 4)
            if ours else None,
            "brute_force_removed_found": round(same / len(exact), 4) if exact else None}


# ------------------------------------------------------------------ text runs


def run_cli(step: dict, source: Path, out: Path, rows: int) -> tuple[dict, dict[str, str], str]:
    job = {"name": "bench-semantic", "input": {"uri": str(source), "columns": {"id": "row_id"}},
           "output": {"uri": str(out), "mode": "overwrite"}, "steps": [step]}
    job_file = out.parent / f"{step['kind']}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    cli = Path(sys.executable).parent / "augment-ray"
    start = time.perf_counter()
    process = subprocess.Popen([str(cli), "run", str(job_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_ADDRESS": ""})
    rss = near_bench.PeakRss(process.pid)
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    memory = rss.close()
    if process.returncode:
        raise SystemExit(f"augment-ray run failed:\n{output[-3000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    column = f"{step['kind']}_duplicate_of"
    rejects = pq.read_table(out / "_rejects", columns=["id", column])
    keeper_of = dict(zip(rejects["id"].to_pylist(), rejects[column].to_pylist(), strict=True))
    entry = {k: v for k, v in summary["steps"][-1].items() if k not in ("columns", "normalize")}
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            **memory, "step": entry}, keeper_of, output


def embed_seconds(log: str) -> float:
    return sum(float(s) for s in re.findall(r"embedded \d+ texts in ([\d.]+)s", log))


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain union-find (the baseline's own, not the project's)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([find(x) for x in range(n)])


def brute_pairs(v: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, c = [], [], []
    for i in range(0, len(v), 2048):
        scores = v[i:i + 2048] @ v.T
        rows, cols = np.nonzero(scores >= low)
        keep = cols > rows + i
        a.append(rows[keep] + i)
        b.append(cols[keep])
        c.append(scores[rows[keep], cols[keep]])
    return np.concatenate(a), np.concatenate(b), np.concatenate(c)


def keepers(ids: list[str], a: np.ndarray, b: np.ndarray) -> dict[str, str]:
    order = np.argsort(np.array(ids))  # index order == id order: the root is the lowest id
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    label = components(len(ids), rank[a], rank[b])
    return {ids[order[r]]: ids[order[label[r]]] for r in range(len(ids)) if label[r] != r}


def baseline(data: dict, threads: int = 2) -> tuple[dict, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from augment_ray.engines.embedding_engine import resolve_embedder_dir

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = SentenceTransformer(resolve_embedder_dir("bundled-minilm"), device="cpu")
    model.max_seq_length = min(model.max_seq_length, 256)
    v = model.encode(data["texts"], batch_size=128, normalize_embeddings=True,
                     convert_to_numpy=True).astype(np.float32)
    embedded = time.perf_counter() - start
    a, b, c = brute_pairs(v, min(SWEEP))
    exact = keepers(data["ids"], a[c >= THRESHOLD], b[c >= THRESHOLD])
    wall = time.perf_counter() - start
    n = len(data["ids"])
    sweep = {f"{t:.2f}": near_bench.score(keepers(data["ids"], a[c >= t], b[c >= t]),
                                          data["ids"], data["truth"]) for t in SWEEP}
    return {"wall_s": round(wall, 2), "rows_per_s": round(n / wall, 1),
            "embed_rows_per_s": round(n / embedded, 1),
            "pairs_s": round(wall - embedded, 2),
            "quality": near_bench.score(exact, data["ids"], data["truth"]),
            **caught(exact, data), "threshold_sweep": sweep, "_keepers": exact}, v


# ------------------------------------------------------------------ vector runs


@ray.remote
def make_block(index: int, rows: int, plants: int, base: np.ndarray, seed: int) -> pa.Table:
    from augment_ray.curate.kmeans import unit
    from augment_ray.steps.embedding_pool import vector_array

    rng = np.random.default_rng([seed, index])
    distinct = rows - plants
    i, j = rng.integers(0, len(base), distinct), rng.integers(0, len(base), distinct)
    w = rng.uniform(0.3, 0.7, (distinct, 1)).astype(np.float32)
    x = unit(w * base[i] + (1 - w) * base[j]
             + rng.normal(0, 0.02, (distinct, base.shape[1])).astype(np.float32))
    parents = rng.integers(0, distinct, plants)
    cos = rng.uniform(0.91, 0.99, plants).astype(np.float32)
    noise = rng.normal(size=(plants, base.shape[1])).astype(np.float32)
    noise -= np.sum(noise * x[parents], axis=1, keepdims=True) * x[parents]
    step = np.sqrt(1 / cos**2 - 1)[:, None]
    planted = unit(x[parents] + step * unit(noise))
    ids = np.array([f"v{index:04d}{k:07d}" for k in range(rows)])
    rng.shuffle(ids)  # the parent is not always the lowest id
    parent = [None] * distinct + ids[parents].tolist()
    n = rows
    return pa.table({
        "id": ids.tolist(), "parent": pa.array(parent, pa.string()),
        "source_id": ids.tolist(), "origin_step": ["input"] * n,
        "reject_step": pa.nulls(n, pa.string()), "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
        "_dedup_semantic_vector": vector_array(n, list(range(n)), np.concatenate([x, planted]),
                                               base.shape[1], "float16"),
    })


@ray.remote
def neighbours(block: pa.Table, queries: np.ndarray, query_ids: list[str],
               threshold: float) -> list[tuple[str, str, float]]:
    from augment_ray.curate.kmeans import unit
    from augment_ray.steps.embedding_pool import vector_matrix

    _, x = vector_matrix(block["_dedup_semantic_vector"])
    scores = queries @ unit(x).T
    q, r = np.nonzero(scores >= threshold)
    ids = block["id"].to_pylist()
    return [(query_ids[a], ids[b], float(scores[a, b])) for a, b in zip(q, r, strict=True)
            if query_ids[a] != ids[b]]


@ray.remote
def query_vectors(block: pa.Table, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    from augment_ray.curate.kmeans import unit
    from augment_ray.steps.embedding_pool import vector_matrix

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(block.num_rows, count, replace=False))
    _, x = vector_matrix(block["_dedup_semantic_vector"].take(pa.array(pick)))
    return block["id"].take(pa.array(pick)).to_pylist(), unit(x)


def run_vectors(rows: int, base: np.ndarray, queries: int, brute_rows: int) -> dict:
    from augment_ray.curate.kmeans import unit
    from augment_ray.steps.dedup_semantic import DedupSemanticStep, DedupSemanticStepSpec

    blocks_n = 32
    per = rows // blocks_n
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    base_ref = ray.put(base)
    blocks = [make_block.remote(b, per, per // 10, base_ref, 7) for b in range(blocks_n)]
    ray.wait(blocks, num_returns=len(blocks))
    step = DedupSemanticStep(DedupSemanticStepSpec(kind="dedup_semantic", threshold=THRESHOLD))
    rss = near_bench.PeakRss(os.getpid())
    start = time.perf_counter()
    out = step.dedup_vectors(ray.data.from_arrow_refs(blocks)).materialize()
    wall = time.perf_counter() - start
    memory = rss.close()
    table = pa.concat_tables(ray.get(out.select_columns(
        ["id", "parent", "dedup_semantic_duplicate_of"]).to_arrow_refs()))
    keeper = dict(zip(table["id"].to_pylist(), table["dedup_semantic_duplicate_of"].to_pylist(),
                      strict=True))

    def root(i: str) -> str:
        return keeper.get(i) or i

    plants = [(i, p) for i, p in zip(table["id"].to_pylist(), table["parent"].to_pylist(),
                                     strict=True) if p is not None]
    found = sum(root(i) == root(p) for i, p in plants)
    picked = [query_vectors.remote(blocks[b], queries // 8, b) for b in range(8)]
    qs = ray.get(picked)
    q_ids = [i for ids, _ in qs for i in ids]
    q_vec = np.concatenate([v for _, v in qs])
    exact = [pair for part in ray.get([neighbours.remote(b, q_vec, q_ids, THRESHOLD)
                                       for b in blocks]) for pair in part]
    together = sum(root(a) == root(b) for a, b, _ in exact)
    # baseline: brute force over a subsample, scaled to the full size
    sample = unit(np.concatenate([v for _, v in ray.get(
        [query_vectors.remote(blocks[b], brute_rows // blocks_n, 100 + b)
         for b in range(blocks_n)])]))
    ray.shutdown()
    started = time.perf_counter()
    a, b, _ = brute_pairs(sample, THRESHOLD)
    components(len(sample), a, b)
    brute = time.perf_counter() - started
    brute_full = brute * (rows / len(sample)) ** 2
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall, 1),
            **memory, "step": step.describe(),
            "planted_pairs": len(plants), "planted_pairs_found": round(found / len(plants), 4),
            "exact_check": {"queries": len(q_ids), "pairs_at_threshold": len(exact),
                            "pairs_in_one_group": round(together / len(exact), 4)
                            if exact else None},
            "baseline_brute_force": {"rows": len(sample), "wall_s": round(brute, 2),
                                     "extrapolated_wall_s_at_rows": round(brute_full, 1)},
            "ratio_vs_brute_force_extrapolated": round(brute_full / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-rows", type=int, default=6000)
    parser.add_argument("--vector-rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--brute-rows", type=int, default=20_000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--vectors-from", default=None,
                        help="(internal) run only the vector part on these base vectors (.npy)")
    args = parser.parse_args()
    if args.vectors_from:  # a process of its own: the driver's memory is the step's alone
        print(json.dumps(run_vectors(args.vector_rows, np.load(args.vectors_from),
                                     args.queries, args.brute_rows)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="augment_ray_bench_semantic_"))
    result: dict = {"machine": {"cpus": os.cpu_count(),
                                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                                "load_average_at_start": [round(x, 1) for x in os.getloadavg()]},
                    "threshold": THRESHOLD, "near_threshold": NEAR_THRESHOLD}
    try:
        data = build_texts(args.text_rows, work / "text")
        text: dict = {"plants": data["plants"]}
        print(f"[bench] {args.text_rows} text rows built", file=sys.stderr)
        sem_step = {"kind": "dedup_semantic", "columns": ["instruction"], "threshold": THRESHOLD}
        sem, sem_keep, log = run_cli(sem_step, work / "text", work / "out-semantic",
                                     args.text_rows)
        sem["embed_rows_per_s"] = round(args.text_rows / embed_seconds(log), 1)
        sem["quality"] = near_bench.score(sem_keep, data["ids"], data["truth"])
        sem.update(caught(sem_keep, data))
        print(f"[bench] ours semantic {sem['wall_s']}s", file=sys.stderr)
        near_step = {"kind": "dedup_near", "columns": ["instruction"],
                     "threshold": NEAR_THRESHOLD}
        near, near_keep, _ = run_cli(near_step, work / "text", work / "out-near", args.text_rows)
        near["quality"] = near_bench.score(near_keep, data["ids"], data["truth"])
        near.update(caught(near_keep, data))
        print(f"[bench] ours near {near['wall_s']}s", file=sys.stderr)
        base, vectors = baseline(data)
        exact = base.pop("_keepers")
        sem["vs_brute_force_same_threshold"] = agreement(sem_keep, exact)
        print(f"[bench] baseline {base['wall_s']}s", file=sys.stderr)
        text.update({"ours_semantic": sem, "ours_near": near, "baseline_encode_brute_force":
                     base, "ratio_ours_semantic_vs_baseline_rows_per_s": round(
                         sem["rows_per_s"] / base["rows_per_s"], 3)})
        result["text"] = text
        np.save(work / "base.npy", vectors[:data["base"]])
        child = subprocess.run(
            [sys.executable, __file__, "--vectors-from", str(work / "base.npy"),
             "--vector-rows", str(args.vector_rows), "--queries", str(args.queries),
             "--brute-rows", str(args.brute_rows)], capture_output=True, text=True, check=True)
        result["vectors"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"[bench] vectors {result['vectors']['wall_s']}s", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
