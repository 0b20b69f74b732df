"""Refine throughput: augment_ray's transformers engine vs plain batched `model.generate`.

Same prompts (the refine template over the bundled sample), same model folder, same threads and
batch size, greedy decoding, in one process and one run. Prints one JSON object:
  baseline_tokens_per_s   plain HF generate, fixed-order batches, left padding
  engine_tokens_per_s     TransformersEngine.generate (length-sorted batches, stop tokens)
  ray_tokens_per_s        the whole `refine` step in a Ray Data actor pool (read -> refine ->
                          write), tokens / wall time of the run including actor start
  ratios                  each divided by the baseline
and the model load times (first = GGUF conversion in a fresh cache, cached = later loads).

Usage: python benchmarks/engines.py [--rows 64] [--max-tokens 64] [--batch-size 32] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"


def load_rows(n: int) -> list[dict]:
    rows = pq.read_table(SAMPLE).to_pylist()
    return rows[:n]


def baseline_generate(model_dir: Path, prompts: list, batch_size: int, max_tokens: int,
                      threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded["input_ids"].shape[1] :]
        # count up to and including the first end token, as the engine does
        for row in new.tolist():
            end = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), None)
            tokens += len(row) if end is None else end + 1
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds}


def engine_generate(prompts: list, batch_size: int, max_tokens: int, threads: int,
                    cache_dir: str) -> dict:
    from augment_ray.config import SamplingParams, TransformersEngineSpec
    from augment_ray.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        TransformersEngineSpec(batch_size=batch_size, threads=threads, cache_dir=cache_dir)
    )
    started = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_tokens=max_tokens))
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds,
            "load_seconds": round(engine.load_seconds, 3)}


def ray_refine(rows: list[dict], batch_size: int, max_tokens: int, threads: int,
               cache_dir: str, workdir: Path) -> dict:
    import pyarrow as pa

    from augment_ray.config import parse_job
    from augment_ray.pipeline import run_job

    source = workdir / "input"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), source / "part-0.parquet")
    job = parse_job({
        "input": {"uri": str(source)},
        "output": {"uri": str(workdir / "output"), "mode": "overwrite"},
        "engines": {"small": {"batch_size": batch_size, "threads": threads,
                              "cache_dir": cache_dir,
                              "sampling": {"max_tokens": max_tokens}}},
        "steps": [{"kind": "refine", "engine": "small"}],
    })
    summary = run_job(job)
    tokens = summary["completion_tokens"]
    return {"tokens": tokens, "seconds": summary["wall_seconds"],
            "tokens_per_s": tokens / summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    from augment_ray.engines.model_files import resolve_model_dir
    from augment_ray.tasks.refine import RefineTask

    rows = load_rows(args.rows)
    task = RefineTask(native=False, output_column="refined_instruction")
    prompts = [task.prompts(row)[0] for row in rows]
    workdir = Path(tempfile.mkdtemp(prefix="augment-ray-bench-"))
    cache_dir = str(workdir / "cache")
    try:
        started = time.perf_counter()
        model_dir = resolve_model_dir("bundled", cache_dir)  # fresh cache: converts the GGUF
        first_load = time.perf_counter() - started
        engine = engine_generate(prompts, args.batch_size, args.max_tokens, args.threads,
                                 cache_dir)
        baseline = baseline_generate(model_dir, prompts, args.batch_size, args.max_tokens,
                                     args.threads)
        result = {
            "benchmark": "refine_engine_vs_hf_generate",
            "rows": len(prompts), "max_tokens": args.max_tokens,
            "batch_size": args.batch_size, "threads": args.threads,
            "model_load_first_s": round(first_load, 3),
            "model_load_cached_s": engine.pop("load_seconds"),
            "baseline": baseline,
            "engine": engine,
            "engine_vs_baseline": round(engine["tokens_per_s"] / baseline["tokens_per_s"], 3),
        }
        if not args.no_ray:
            ray_result = ray_refine(rows, args.batch_size, args.max_tokens, args.threads,
                                    cache_dir, workdir)
            result["ray_step"] = ray_result
            result["ray_step_vs_baseline"] = round(
                ray_result["tokens_per_s"] / baseline["tokens_per_s"], 3
            )
        json.dump(result, sys.stdout, indent=2)
        print()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
