"""CLEAR scoring quality and speed: does a judge's confidence separate good rows from bad ones?

Builds a labelled set from GSM8K test rows (question -> instruction, worked answer -> output)
and corrupts a share of them deterministically (--seed):
  swapped_answer     half of the corrupted rows get another corrupted row's answer (a
                     derangement: no row keeps its own, and no row gets an answer with the same
                     final number)
  perturbed_number   the other half keep their answer with the final number changed by a
                     random non-zero delta (after '####' and wherever the last reasoning line
                     writes that number, so the text still looks self-consistent)
Every other row is clean (the positive class). The rows are one Parquet shard.

For each method configuration (--methods): p_yes, self_reflection, consistency (match:
final_number), rubric and bsdetector (consistency + self_reflection, beta 0.7), runs the job
  read -> score (that configuration) -> auto_filter (median threshold) -> write
in-process with augment_ray.config.parse_job + augment_ray.pipeline.run_job on one local Ray
(started once), reads back data/ and _rejects/ and reports per method:
  auroc                      of score_confidence, clean (positive) vs corrupted, over the rows
                             that got a confidence (plus per corruption kind and per component)
  corrupted_removed_share    corrupted rows auto_filter rejected (low_confidence) / corrupted
  clean_lost_share           clean rows auto_filter rejected (low_confidence) / clean
  rows_per_s                 rows / the run's wall_seconds (whole job: Ray actor start, model
                             load, read, score, threshold, write)
  score_stage_rows_per_s     rows / the time of the barrier auto_filter waits on (read + score,
                             actor start and model load included; no write)
  tokens, other reject reasons, and whether every input row came back exactly once.
With the default engine (the bundled SmolLM2-135M-Instruct on CPU) it also runs, in the same
process, plain transformers P(Yes): the same yes/no judge prompts, one forward pass per
left-padded batch of 16, P(Yes) / (P(Yes) + P(No)) at the last position; its AUROC and rows/s,
and the pipeline's p_yes rows/s divided by it.

--engine-yaml FILE replaces the judge engine spec (a YAML mapping as under `engines.NAME` of a
job), so the same command measures a real judge on a GPU cluster.

Usage: python benchmarks/clear_eval.py [--rows 100] [--corrupt-share 0.2] [--seed 0]
       [--methods p_yes,bsdetector] [--engine-yaml judge.yaml] [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BUNDLED_SAMPLE = ROOT / "jobs" / "data" / "eval" / "gsm8k_test_200.jsonl"
ENGINE = "judge"
DEFAULT_ENGINE: dict[str, Any] = {
    "kind": "transformers", "model": "bundled", "num_cpus": 1, "threads": 2, "batch_size": 16,
    "sampling": {"temperature": 0.0, "max_tokens": 32, "seed": 0},
}
METHODS: dict[str, dict[str, Any]] = {
    "p_yes": {"methods": ["p_yes"]},
    "self_reflection": {"methods": ["self_reflection"]},
    "consistency": {"methods": ["consistency"], "consistency_match": "final_number"},
    "rubric": {"methods": ["rubric"]},
    "bsdetector": {"methods": ["consistency", "self_reflection"],
                   "consistency_match": "final_number", "beta": 0.7},
}
CLEAN, SWAPPED, PERTURBED = "clean", "swapped_answer", "perturbed_number"
BASELINE_BATCH = 16
YES_WORDS, NO_WORDS = ("Yes", " Yes", "yes"), ("No", " No", "no")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data

_FINAL = re.compile(r"####\s*(-?[\d,]+)\s*$")


def final_integer(answer: str) -> int | None:
    """The integer after '####' (GSM8K's final answer), or None when it is not an integer."""
    match = _FINAL.search(answer.strip())
    if not match:
        return None
    try:
        return int(match.group(1).replace(",", ""))
    except ValueError:
        return None


def number_pattern(value: int) -> str:
    """A regex for `value` written plainly or with thousands separators, as a whole number."""
    forms = sorted({str(value), f"{value:,}"}, key=len, reverse=True)
    return r"(?<![\d.,])(?:" + "|".join(re.escape(f) for f in forms) + r")(?![\d]|[.,]\d)"


def _reformat(old_text: str, new: int) -> str:
    return f"{new:,}" if "," in old_text else str(new)


def perturb(answer: str, rng: random.Random) -> tuple[str, int, int, int]:
    """The answer with its final number changed by a non-zero delta, also everywhere the last
    reasoning line writes that number (in the same style: plain or with commas).
    Returns (text, old, new, occurrences changed in the last reasoning line)."""
    old = final_integer(answer)
    if old is None:
        raise ValueError("no integer final answer")
    span = max(3, round(abs(old) * 0.3))
    new = old
    while new == old or (old >= 0 > new):
        new = old + rng.choice([-1, 1]) * rng.randint(1, span)
    lines = answer.rstrip().split("\n")
    mark = lines[-1]
    lines[-1] = mark[: mark.index("####")] + "#### " + _reformat(mark.split("####")[1], new)
    changed = 0
    if len(lines) >= 2:
        lines[-2], changed = re.subn(number_pattern(old),
                                     lambda m: _reformat(m.group(0), new), lines[-2])
    return "\n".join(lines), old, new, changed


def derangement(items: list[int], finals: dict[int, int | None], rng: random.Random
                ) -> dict[int, int]:
    """receiver -> donor: Sattolo's algorithm gives one cycle, so no row keeps its own answer;
    reshuffled (bounded) until no row receives an answer with its own final number."""
    for _ in range(1000):
        order = list(items)
        for i in range(len(order) - 1, 0, -1):  # Sattolo: j < i
            j = rng.randrange(i)
            order[i], order[j] = order[j], order[i]
        mapping = {items[k]: order[k] for k in range(len(items))}
        if all(finals[r] != finals[d] for r, d in mapping.items()):
            return mapping
    return mapping  # pathological data: the caller reports same-final swaps


def load_gsm8k(data_dir: Path, split: str = "test") -> tuple[list[dict[str, str]], Path]:
    path = data_dir / f"gsm8k_{split}.jsonl"
    if not path.is_file():
        if split != "test":
            raise SystemExit(f"{path} is missing")
        path = BUNDLED_SAMPLE
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows], path


def build_dataset(data_dir: Path, n: int, share: float, seed: int, out_dir: Path,
                  split: str = "test", label_column: bool = False
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Writes out_dir/part-0.parquet (id, instruction, output, and with label_column the
    truth as `corruption`) and returns the truth per id and a description of the data."""
    source_rows, path = load_gsm8k(data_dir, split)
    rng = random.Random(seed)
    if n > len(source_rows):
        raise SystemExit(f"--rows {n} > {len(source_rows)} rows in {path}")
    picked = sorted(rng.sample(range(len(source_rows)), n))
    rows = {i: dict(source_rows[i]) for i in picked}
    finals = {i: final_integer(rows[i]["answer"]) for i in picked}
    n_corrupt = round(n * share)
    n_swap = n_corrupt // 2 if n_corrupt >= 4 else 0
    n_perturb = n_corrupt - n_swap
    perturbable = [i for i in picked if finals[i] is not None]
    perturbed = sorted(rng.sample(perturbable, n_perturb))
    rest = [i for i in picked if i not in set(perturbed)]
    swapped = sorted(rng.sample(rest, n_swap))
    truth: dict[str, dict[str, Any]] = {}
    examples: dict[str, Any] = {}
    same_final_swaps = 0
    for receiver, donor in derangement(swapped, finals, rng).items():
        rows[receiver]["corrupted"] = rows[donor]["answer"]
        same_final_swaps += finals[receiver] == finals[donor]
        truth[f"gsm8k-{split}-{receiver:04d}"] = {"kind": SWAPPED, "donor": donor}
    unchanged_lines = 0
    for i in perturbed:
        text, old, new, changed = perturb(rows[i]["answer"], rng)
        rows[i]["corrupted"] = text
        unchanged_lines += changed == 0
        truth[f"gsm8k-{split}-{i:04d}"] = {"kind": PERTURBED, "old": old, "new": new}
        examples.setdefault(PERTURBED, {"original_tail": rows[i]["answer"][-160:],
                                        "corrupted_tail": text[-160:]})
    table_rows = []
    for i in picked:
        row_id = f"gsm8k-{split}-{i:04d}"
        truth.setdefault(row_id, {"kind": CLEAN})
        table_rows.append({"id": row_id, "instruction": rows[i]["question"],
                           "output": rows[i].get("corrupted", rows[i]["answer"])})
        if label_column:
            table_rows[-1]["corruption"] = truth[row_id]["kind"]
    out_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(table_rows), out_dir / "part-0.parquet")
    kinds = Counter(t["kind"] for t in truth.values())
    info = {
        "source_file": str(path), "source_rows": len(source_rows), "rows": n, "seed": seed,
        "corrupt_share": share, "clean": kinds[CLEAN],
        "corrupted": {SWAPPED: kinds[SWAPPED], PERTURBED: kinds[PERTURBED]},
        "swaps_with_same_final_number": same_final_swaps,
        "perturbed_without_last_line_change": unchanged_lines,
        "example": examples,
    }
    return truth, info


# ------------------------------------------------------------------ pipeline runs


@contextlib.contextmanager
def timed_barrier(times: list[float]) -> Iterator[None]:
    """Times auto_filter's dataset_threshold (the materialize barrier: read + score, actor start
    and model load included) by wrapping the module function for the duration of one run."""
    from augment_ray.steps import auto_filter

    original = getattr(auto_filter, "dataset_threshold", None)
    if original is None:
        yield
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    auto_filter.dataset_threshold = wrapped
    try:
        yield
    finally:
        auto_filter.dataset_threshold = original


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of every parquet file under `folder`, each file read on its own (files of one
    run may have different schemas)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.parquet")) if folder.is_dir() else ():
        rows += pq.read_table(path).to_pylist()
    return rows


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def evaluate(rows: list[dict[str, Any]], truth: dict[str, dict[str, Any]],
             columns: list[str]) -> dict[str, Any]:
    """AUROC of each confidence column (clean = positive), overall and per corruption kind."""
    from augment_ray.curate.confidence import auroc

    result: dict[str, Any] = {}
    for column in columns:
        scored = [(r[column], truth[r["id"]]["kind"]) for r in rows if r.get(column) is not None]
        entry: dict[str, Any] = {
            "scored_rows": len(scored),
            "auroc": rounded(auroc([s for s, _ in scored], [k == CLEAN for _, k in scored])),
        }
        for kind in (SWAPPED, PERTURBED):
            subset = [(s, k) for s, k in scored if k in (CLEAN, kind)]
            entry[f"auroc_clean_vs_{kind}"] = rounded(
                auroc([s for s, _ in subset], [k == CLEAN for _, k in subset]))
        values = sorted(s for s, _ in scored)
        if values:
            entry["distribution"] = {"min": rounded(values[0]),
                                     "median": rounded(values[len(values) // 2]),
                                     "max": rounded(values[-1]),
                                     "distinct_values": len(set(values))}
        result[column] = entry
    return result


def run_method(name: str, config: dict[str, Any], engine: dict[str, Any], source: Path,
               output: Path, truth: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from augment_ray.config.job import parse_job
    from augment_ray.pipeline import run_job

    job = parse_job({
        "name": f"clear-eval-{name.replace('_', '-')}",
        "input": {"uri": str(source)},
        "output": {"uri": str(output), "mode": "overwrite"},
        "engines": {ENGINE: engine},
        "steps": [{"kind": "score", "engine": ENGINE, **config}, {"kind": "auto_filter"}],
    }, source=f"clear_eval job {name}")
    barrier: list[float] = []
    load_before = os.getloadavg()[0]
    with timed_barrier(barrier):
        summary = run_job(job)
    load_after = os.getloadavg()[0]
    kept, rejected = read_rows(output / "data"), read_rows(output / "_rejects")
    n = len(truth)
    returned = Counter(r["id"] for r in kept + rejected)
    accounted = returned == Counter(truth.keys()) and len(kept) + len(rejected) == n

    corrupted = {i for i, t in truth.items() if t["kind"] != CLEAN}
    clean = set(truth) - corrupted
    low = {r["id"] for r in rejected if r.get("reject_reason") == "low_confidence"}
    any_reject = {r["id"] for r in rejected}
    reasons = Counter(f"{r.get('reject_step')}:{r.get('reject_reason')}" for r in rejected)
    other = {k: v for k, v in reasons.items() if not k.endswith(":low_confidence")}
    auto = next((s for s in summary["steps"] if s.get("kind") == "auto_filter"), {})
    wall = summary["wall_seconds"]
    components = [f"score_{m}" for m in config["methods"]]
    quality = evaluate(kept + rejected, truth, ["score_confidence", *components])
    overall = quality.pop("score_confidence")
    details: Counter[str] = Counter()
    for r in rejected:
        if r.get("reject_reason") == "unscorable":
            details[(r.get("reject_detail") or "")[:160]] += 1
    result: dict[str, Any] = {
        "config": config,
        "auroc": overall["auroc"],
        "scored_rows": overall["scored_rows"],
        "auroc_clean_vs_swapped_answer": overall[f"auroc_clean_vs_{SWAPPED}"],
        "auroc_clean_vs_perturbed_number": overall[f"auroc_clean_vs_{PERTURBED}"],
        "confidence_distribution": overall.get("distribution"),
        "components": quality if len(components) > 1 else {},
        "threshold": auto.get("threshold"),
        "threshold_from": auto.get("threshold_from"),
        "corrupted_removed_share": share(len(corrupted & low), len(corrupted)),
        "clean_lost_share": share(len(clean & low), len(clean)),
        "corrupted_rejected_any_reason_share": share(len(corrupted & any_reject), len(corrupted)),
        "clean_rejected_any_reason_share": share(len(clean & any_reject), len(clean)),
        "removed_rows_corrupted_share": share(len(corrupted & low), len(low)),
        "rows_in": n, "rows_out": len(kept), "rows_rejected": len(rejected),
        "accounted": accounted,
        "reject_reasons": dict(sorted(reasons.items())),
        "other_reject_reasons": dict(sorted(other.items())),
        "unscorable_details_top": [{"count": c, "detail": d} for d, c in details.most_common(3)],
        "wall_seconds": wall,
        "rows_per_s": round(n / wall, 3) if wall else None,
        "score_stage_seconds": round(barrier[0], 3) if barrier else None,
        "score_stage_rows_per_s": round(n / barrier[0], 3) if barrier else None,
        "prompt_tokens": summary["prompt_tokens"],
        "completion_tokens": summary["completion_tokens"],
        "completion_tokens_per_s": summary["completion_tokens_per_second"],
        "load_average_1min_before_after": [round(load_before, 2), round(load_after, 2)],
    }
    scores = {r["id"]: r.get("score_p_yes") for r in kept + rejected}
    return {"result": result, "p_yes_by_id": scores}


# ------------------------------------------------------------------ raw baseline


def raw_p_yes(rows: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Plain transformers: the p_yes judge prompts, one forward pass per left-padded batch,
    P(Yes) / (P(Yes) + P(No)) over the single-token variants of each word at the last position.
    Timed: chat template + tokenize + forward (model load reported apart)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from augment_ray.engines.model_files import resolve_model_dir
    from augment_ray.tasks.judge import yes_no_prompt

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model_dir = resolve_model_dir("bundled", None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - started

    def single_ids(words: tuple[str, ...]) -> list[int]:
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        return sorted({i[0] for i in ids if len(i) == 1})

    yes_ids, no_ids = single_ids(YES_WORDS), single_ids(NO_WORDS)
    started = time.perf_counter()
    texts = [tokenizer.apply_chat_template(yes_no_prompt(r["instruction"], r["output"]),
                                           add_generation_prompt=True, tokenize=False)
             for r in rows]
    values: list[float] = []
    for start in range(0, len(texts), BASELINE_BATCH):
        encoded = tokenizer(texts[start:start + BASELINE_BATCH], return_tensors="pt",
                            padding=True, add_special_tokens=False)
        mask = encoded["attention_mask"]
        # left padding: positions count from each row's first real token, as generate() does
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=encoded["input_ids"], attention_mask=mask,
                           position_ids=positions).logits[:, -1, :]
        probs = torch.softmax(logits.float(), dim=-1)
        yes, no = probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)
        values += (yes / (yes + no)).tolist()
    seconds = time.perf_counter() - started
    return {"values": values, "seconds": seconds, "load_seconds": load,
            "load_average_1min_after": round(os.getloadavg()[0], 2),
            "yes_token_ids": yes_ids, "no_token_ids": no_ids}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


# ------------------------------------------------------------------ main


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(),
                            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-share", type=float, default=0.2)
    parser.add_argument("--data", type=Path, default=DATA,
                        help="folder with gsm8k_test.jsonl (default ../shared/data; the "
                        "bundled 200-row sample when it is missing)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--engine-yaml", type=Path, default=None,
                        help="YAML mapping that replaces the judge engine spec")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                        help="CPUs of the local Ray started for the whole harness")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument("--write-sample", type=Path, default=None, metavar="DIR",
                        help="only write the labelled dataset (with a `corruption` column) "
                        "to DIR and stop; jobs/data/gsm8k_noisy is made this way")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="GSM8K file the rows come from")
    parser.add_argument("--note", action="append", default=[],
                        help="a note about this run to add to the JSON (repeatable)")
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not 0.0 <= args.corrupt_share <= 1.0:
        parser.error("--corrupt-share must be in [0, 1]")
    engine = DEFAULT_ENGINE
    if args.engine_yaml is not None:
        loaded = yaml.safe_load(args.engine_yaml.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            parser.error(f"{args.engine_yaml} is not a YAML mapping")
        engine = loaded
    default_engine = engine == DEFAULT_ENGINE
    if args.write_sample is not None:
        _, info = build_dataset(args.data, args.rows, args.corrupt_share, args.seed,
                                args.write_sample, args.split, label_column=True)
        print(json.dumps({"wrote": str(args.write_sample), **info}, indent=2))
        return

    import ray

    total_started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="augment_ray_bench_clear_"))
    result: dict[str, Any] = {"benchmark": "clear_eval", "machine": machine_info()}
    try:
        source = work / "input"
        truth, data_info = build_dataset(args.data, args.rows, args.corrupt_share, args.seed,
                                         source)
        result["data"] = data_info
        from augment_ray.engines.model_files import model_display_name

        result["engine"] = {"spec": engine, "default_bundled": default_engine,
                            "model": model_display_name(str(engine.get("model", "bundled")))}
        log(f"{args.rows} rows ({data_info['corrupted']}) from {data_info['source_file']}")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
        result["machine"]["ray_num_cpus"] = args.num_cpus
        result["methods"] = {}
        pipeline_p_yes: dict[str, float | None] = {}
        for name in methods:
            started = time.perf_counter()
            run = run_method(name, METHODS[name], engine, source, work / f"out-{name}", truth)
            result["methods"][name] = run["result"]
            if name == "p_yes":
                pipeline_p_yes = run["p_yes_by_id"]
            r = run["result"]
            log(f"{name}: auroc {r['auroc']} removed {r['corrupted_removed_share']} lost "
                f"{r['clean_lost_share']} {r['rows_per_s']} rows/s "
                f"({time.perf_counter() - started:.1f}s)")
        ray.shutdown()

        if default_engine:
            rows = pq.read_table(source).to_pylist()
            raw = raw_p_yes(rows, threads=int(DEFAULT_ENGINE["threads"]))
            from augment_ray.curate.confidence import auroc

            labels = [truth[r["id"]]["kind"] == CLEAN for r in rows]
            baseline: dict[str, Any] = {
                "auroc": rounded(auroc(raw["values"], labels)),
                "rows": len(rows), "batch_size": BASELINE_BATCH,
                "threads": DEFAULT_ENGINE["threads"],
                "seconds": round(raw["seconds"], 3),
                "rows_per_s": round(len(rows) / raw["seconds"], 3),
                "model_load_seconds": round(raw["load_seconds"], 3),
                "load_average_1min_after": raw["load_average_1min_after"],
                "yes_token_ids": raw["yes_token_ids"], "no_token_ids": raw["no_token_ids"],
            }
            if "p_yes" in result["methods"]:
                ours = result["methods"]["p_yes"]
                baseline["pipeline_p_yes_vs_raw_rows_per_s"] = round(
                    ours["rows_per_s"] / baseline["rows_per_s"], 4)
                if ours["score_stage_rows_per_s"]:
                    baseline["pipeline_p_yes_score_stage_vs_raw_rows_per_s"] = round(
                        ours["score_stage_rows_per_s"] / baseline["rows_per_s"], 4)
                pairs = [(pipeline_p_yes.get(r["id"]), v)
                         for r, v in zip(rows, raw["values"], strict=True)]
                both = [(a, b) for a, b in pairs if a is not None]
                baseline["agreement_with_pipeline_p_yes"] = {
                    "rows_compared": len(both),
                    "pearson": rounded(pearson([a for a, _ in both], [b for _, b in both])),
                    "max_abs_diff": rounded(max((abs(a - b) for a, b in both), default=None)),
                }
            result["baseline_raw_transformers_p_yes"] = baseline
            log(f"raw p_yes: auroc {baseline['auroc']} {baseline['rows_per_s']} rows/s")
        else:
            result["baseline_raw_transformers_p_yes"] = None
        result["total_wall_seconds"] = round(time.perf_counter() - total_started, 1)
        result["notes"] = notes(result, engine) + args.note
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


def notes(result: dict[str, Any], engine: dict[str, Any]) -> list[str]:
    sampling = engine.get("sampling") or {}
    out = [
        "Positive class = clean rows. AUROC 0.5 is chance; a judge with no signal removes about "
        "the same share of corrupted and clean rows at the median threshold (about half of "
        "each, fewer when many rows tie at the median: auto_filter keeps confidence >= the "
        "threshold).",
        "rows_per_s is over each job's whole wall time (local Ray actor start, model load, read, "
        "score, threshold, write). score_stage_* times the barrier auto_filter waits on (read + "
        "score, actor start and model load included), measured by wrapping "
        "augment_ray.steps.auto_filter.dataset_threshold in this process; nothing is tuned.",
        f"Consistency samples are the engine's sampling (max_tokens "
        f"{sampling.get('max_tokens', 'default')}) at the step's default temperature and k; "
        "GSM8K solutions are usually longer than 32 tokens, so with the default engine a "
        "sample's 'final number' is often just the last number written before the cut, which "
        "depresses consistency for every row alike.",
        "The raw baseline reads the full softmax over the single-token variants of Yes/No "
        "('Yes', ' Yes', 'yes' / 'No', ' No', 'no'); the pipeline's p_yes reads the engine's "
        "top-20 logprobs and counts any token that folds to a yes/no word, so the two can differ "
        "slightly (see agreement_with_pipeline_p_yes).",
        "load_average_* fields are the machine's 1-minute load average (os.getloadavg): this "
        "harness alone keeps it near the CPU count; much higher means other processes shared "
        "the CPUs during the run and its timings are pessimistic.",
    ]
    if result.get("baseline_raw_transformers_p_yes"):
        out.append("The engine sorts prompts by length before batching (less padding), while the "
                   "raw baseline batches them in input order; the raw time counts chat template, "
                   "tokenizing and forward passes only, the pipeline's counts everything.")
    for name, method in result["methods"].items():
        low = (method.get("confidence_distribution") or {}).get("min")
        if method["threshold"] is not None and low is not None and method["threshold"] <= low:
            out.append(f"{name}: the median confidence ({method['threshold']}) is also the "
                       "minimum, so auto_filter (keep confidence >= threshold) removed no row.")
        unscorable = method["rows_in"] - method["scored_rows"]
        if unscorable:
            out.append(f"{name}: {unscorable} of {method['rows_in']} rows got no confidence "
                       f"({method['other_reject_reasons']}); its AUROC and threshold use only "
                       f"the {method['scored_rows']} scored rows.")
    if result["engine"]["default_bundled"]:
        out.append("The default judge is the bundled SmolLM2-135M-Instruct on CPU: far too small "
                   "to judge GSM8K solutions, so AUROCs near 0.5 are expected; use --engine-yaml "
                   "with a real judge for meaningful quality numbers.")
    return out


if __name__ == "__main__":
    main()
