"""Refine win rate: does refining an instruction make a model answer it better?

For each MT-Bench question (its first turn; jobs/data/eval/mt_bench_questions.jsonl, all 80,
Apache-2.0, licence in jobs/data/eval/LICENSE.md):
  1. refine    the real pipeline (parse_job + run_job on a local Ray): read -> refine -> write
               -> commit, the `refine` step with its defaults (validators, retries, rejects) and
               max_reject_share 1.0 so a weak model's rejects are counted, not fatal
               (--refine-option FIELD=VALUE sets any other field, e.g. checks=false). Rows in
               `_rejects/` are counted by reason; only questions whose refinement survived
               (`refined_instruction` in `data/`) go on.
  2. answer    the answering engine answers the original and the refined instruction (each the
               only user message), in this process (augment_ray.engines.base.build_engine).
  3. judge     the judge engine compares the two answers against the ORIGINAL question with
               benchmarks/refine_winrate_judge.txt, twice: original answer as A and refined as
               B, then swapped. It replies A, B or C (tie); an answer that cannot be read as one
               of them (or a failed call) is a tie and is counted.
A question is a win (refined answer better) or a loss only when both orders name the same
answer; anything else is a tie.

Engines: the bundled model (kind transformers, model bundled) for every role by default.
--engines FILE.yaml holds an `engines:` mapping as in a job file with keys refine, answer and/or
judge (missing ones stay bundled), checked with the project's job spec, e.g.
    engines:
      judge: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: qwen2.5-72b-instruct}
--max-tokens and --seed override every engine's sampling for refine and answer; the judge gets
--judge-max-tokens. A vllm engine used for answer or judge runs in this process (needs the GPU
here); the refine engine runs in a Ray actor pool as in any job.

Usage: python benchmarks/refine_winrate.py [--questions N] [--max-tokens 64] [--seed 0]
       [--judge-max-tokens 8] [--engines engines.yaml] [--refine-option checks=false]
       [--out result.json] [--details per_question.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "jobs" / "data" / "eval" / "mt_bench_questions.jsonl"
JUDGE_TEMPLATE = Path(__file__).resolve().with_name("refine_winrate_judge.txt")
ROLES = ("refine", "answer", "judge")
DEFAULT_ENGINE: dict[str, Any] = {
    "kind": "transformers", "model": "bundled", "num_cpus": 1, "threads": 2, "batch_size": 16,
}
# which answer sits in position A in each order
ORDERS = {"original_first": ("original", "refined"), "refined_first": ("refined", "original")}
Z95 = 1.959964


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs


def load_questions(path: Path, n: int | None) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if n is not None:
        if not 0 < n <= len(rows):
            raise SystemExit(f"--questions {n}: {path} holds {len(rows)} questions")
        rows = rows[:n]
    return [{"id": f"mt-bench-{r['question_id']:03d}", "question_id": r["question_id"],
             "category": r["category"], "instruction": r["turns"][0]} for r in rows]


def refine_step(options: dict[str, Any], max_tokens: int, seed: int) -> dict[str, Any]:
    """The refine step as a job file would hold it: the step's defaults, --max-tokens/--seed as
    its sampling, max_reject_share 1.0 (count rejects, never fail on them), then the user's
    --refine-option fields."""
    step: dict[str, Any] = {"kind": "refine", "engine": "refine", "max_reject_share": 1.0,
                            "sampling": {"max_tokens": max_tokens, "seed": seed}}
    return {**step, **options}


def load_engines(path: Path | None, step: dict[str, Any] | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The raw engine mapping per role (bundled where the file names none) and the validated
    specs, checked in a job with `step` (default: a plain refine step). Errors are the
    project's job-spec errors, naming the file and field."""
    from augment_ray.config.job import check_engine_reference, parse_job
    from augment_ray.errors import JobSpecError

    raw: dict[str, dict[str, Any]] = {role: dict(DEFAULT_ENGINE) for role in ROLES}
    source = str(path) if path else "default engines"
    if path is not None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or set(data) != {"engines"} or not isinstance(
                data["engines"], dict):
            raise JobSpecError(f"{source}: expected one top-level key `engines:`, a mapping "
                               f"with keys among {', '.join(ROLES)}.")
        unknown = sorted(set(data["engines"]) - set(ROLES))
        if unknown:
            raise JobSpecError(f"{source}: engines.{unknown[0]}: unknown role; expected "
                               f"{', '.join(ROLES)}.")
        raw.update(data["engines"])
    job = parse_job({"input": {"uri": "unused"}, "output": {"uri": "unused"}, "engines": raw,
                     "steps": [step or {"kind": "refine", "engine": "refine"}]}, source=source)
    for role in ("answer", "judge"):
        try:
            check_engine_reference(f"engines.{role}", role, job.engines)
        except ValueError as error:
            raise JobSpecError(f"{source} is not a valid job: {error}.") from None
    return raw, dict(job.engines)


# ------------------------------------------------------------------ 1. refine (the pipeline)


def run_refine(questions: list[dict[str, Any]], engine: dict[str, Any], step: dict[str, Any],
               work: Path) -> dict[str, Any]:
    import ray

    from augment_ray.config.job import parse_job
    from augment_ray.pipeline import run_job

    source = work / "questions.jsonl"
    source.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions),
                      encoding="utf-8")
    output = work / "refined"
    job = parse_job({
        "name": "refine-winrate",
        "input": {"uri": str(source), "format": "jsonl"},
        "output": {"uri": str(output), "mode": "overwrite"},
        "engines": {"refine": engine},
        "steps": [step],
    }, source="refine_winrate job")
    started = time.perf_counter()
    try:
        summary = run_job(job)
    finally:
        ray.shutdown()  # frees the CPUs for the answer and judge engines in this process
    seconds = time.perf_counter() - started
    kept = read_rows(output / "data")
    rejected = read_rows(output / "_rejects")
    step = next(s for s in summary["steps"] if s.get("kind") == "refine")
    return {
        "refined": {r["id"]: r["refined_instruction"] for r in kept},
        "truncated": sum(r.get("refine_finish_reason") == "length" for r in kept),
        "rejected": {r["id"]: (f"{r['reject_step']}:{r['reject_reason']}",
                               (r.get("reject_detail") or "")[:200]) for r in rejected},
        "seconds": seconds, "summary_wall_seconds": summary["wall_seconds"],
        "prompt_tokens": step.get("prompt_tokens", 0),
        "completion_tokens": step.get("completion_tokens", 0),
    }


def read_rows(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.parquet")) if folder.is_dir() else ():
        rows += pq.read_table(path).to_pylist()
    return rows


# ------------------------------------------------------------------ 2, 3. answer and judge


class Engines:
    """The answer and judge engines, loaded once each; one copy when both roles name the same
    model (sampling is passed per call, so it does not make engines differ)."""

    def __init__(self, specs: dict[str, Any]) -> None:
        from augment_ray.engines.base import build_engine, engine_class

        self.load_seconds: dict[str, float] = {}
        self.engines: dict[str, Any] = {}
        for role in ("answer", "judge"):
            spec = specs[role]
            same = [r for r in self.engines
                    if specs[r].model_dump(exclude={"sampling"})
                    == spec.model_dump(exclude={"sampling"})]
            if same:
                self.engines[role] = self.engines[same[0]]
                continue
            started = time.perf_counter()
            engine_class(spec).prepare(spec)
            self.engines[role] = build_engine(spec)
            self.load_seconds[role] = round(time.perf_counter() - started, 3)

    def close(self) -> None:
        for engine in {id(e): e for e in self.engines.values()}.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def judge_prompt(template: str, question: str, answer_a: str, answer_b: str) -> str:
    # str.format substitutes values once, so braces inside answers are safe
    return template.format(question=question, answer_a=answer_a.strip() or "(no answer)",
                           answer_b=answer_b.strip() or "(no answer)")


_BRACKETED = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_ONLY = re.compile(r"^[\W_]*([ABCabc])[\W_]*$")
# "A", "B." or "A is better" at the start, but not the article in "A good answer ..."
_LEADING = re.compile(r"^[\s*\"'(\[]*([ABC])(?![A-Za-z])"
                      r"(?!\s+(?!is\b|wins\b|better\b|because\b)[a-z])")
_NAMED = re.compile(r"(?i:\b(?:answer|option|choice|verdict|output|response))"
                    r"\s*(?i:is)?\s*[:(*\s]*([ABC])(?![A-Za-z])")
_TIE = re.compile(r"(?i)\b(?:tie|equally good|equally helpful|both are (?:equally )?good)\b")


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from a judge's reply, or None when it names none of them."""
    text = text.strip()
    for pattern in (_BRACKETED, _ONLY, _LEADING, _NAMED):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return "C" if _TIE.search(text) else None


def outcome(order: str, verdict: str | None) -> str:
    """'refined', 'original' or 'tie' for one order's verdict."""
    if verdict in ("A", "B"):
        return ORDERS[order][0 if verdict == "A" else 1]
    return "tie"


def wilson(successes: int, n: int, z: float = Z95) -> list[float] | None:
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def rate(successes: int, n: int) -> dict[str, Any]:
    return {"value": round(successes / n, 4) if n else None, "successes": successes, "n": n,
            "ci95_wilson": wilson(successes, n)}


def texts(results: list[Any]) -> list[str | None]:
    from augment_ray.engines.base import Completion

    return [r.text if isinstance(r, Completion) else None for r in results]


def token_sums(results: list[Any]) -> dict[str, int]:
    from augment_ray.engines.base import Completion

    done = [r for r in results if isinstance(r, Completion)]
    return {"prompt_tokens": sum(r.prompt_tokens for r in done),
            "completion_tokens": sum(r.completion_tokens for r in done)}


def answer_and_judge(questions: list[dict[str, Any]], refined: dict[str, str],
                     specs: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    from augment_ray.engines.base import Completion

    template = JUDGE_TEMPLATE.read_text(encoding="utf-8").strip()
    todo = [q for q in questions if q["id"] in refined]
    if not todo:  # every refinement rejected: nothing to answer, no engine to load
        return {"pairs": [], "failed": {}, "by_order": {order: [] for order in ORDERS},
                "answer_truncated": {"original": 0, "refined": 0},
                "answer_tokens": token_sums([]), "judge_tokens": token_sums([]),
                "answer_seconds": 0.0, "judge_seconds": 0.0, "load_seconds": {}}
    engines = Engines(specs)
    try:
        started = time.perf_counter()
        prompts = [user(q["instruction"]) for q in todo] + [user(refined[q["id"]]) for q in todo]
        answers = engines.engines["answer"].generate(prompts, sampling["answer"])
        answer_seconds = time.perf_counter() - started
        original, rewritten = answers[:len(todo)], answers[len(todo):]
        failed: dict[str, str] = {}
        pairs = []
        for q, a, b in zip(todo, original, rewritten, strict=True):
            if isinstance(a, Completion) and isinstance(b, Completion):
                pairs.append((q, a.text, b.text))
            else:
                bad = a if not isinstance(a, Completion) else b
                failed[q["id"]] = bad.reason
        started = time.perf_counter()
        judge_prompts = [user(judge_prompt(template, q["instruction"], *(
            (orig, new) if order == "original_first" else (new, orig))))
            for order in ORDERS for q, orig, new in pairs]
        verdict_results = (engines.engines["judge"].generate(judge_prompts, sampling["judge"])
                           if judge_prompts else [])
        judge_seconds = time.perf_counter() - started
    finally:
        engines.close()
    replies = texts(verdict_results)
    by_order = {order: replies[i * len(pairs):(i + 1) * len(pairs)]
                for i, order in enumerate(ORDERS)}
    return {
        "pairs": pairs, "failed": failed, "by_order": by_order,
        "answer_truncated": {
            "original": sum(isinstance(r, Completion) and r.finish_reason == "length"
                            for r in original),
            "refined": sum(isinstance(r, Completion) and r.finish_reason == "length"
                           for r in rewritten)},
        "answer_tokens": token_sums(answers), "judge_tokens": token_sums(verdict_results),
        "answer_seconds": answer_seconds, "judge_seconds": judge_seconds,
        "load_seconds": engines.load_seconds,
    }


# ------------------------------------------------------------------ scoring


def score(pairs: list[tuple[dict[str, Any], str, str]],
          by_order: dict[str, list[str | None]]) -> dict[str, Any]:
    tally: Counter[str] = Counter()
    votes = {order: Counter({"A": 0, "B": 0, "C": 0, "unparsable": 0, "failed": 0})
             for order in ORDERS}
    votes_as = {order: Counter({"refined": 0, "original": 0, "tie": 0}) for order in ORDERS}
    categories: dict[str, Counter[str]] = {}
    consistent = 0
    unparsable_examples: list[str] = []
    rows = []
    for index, (q, original_answer, refined_answer) in enumerate(pairs):
        outcomes = {}
        verdicts = {}
        for order in ORDERS:
            reply = by_order[order][index]
            verdict = None if reply is None else parse_verdict(reply)
            if reply is None:
                votes[order]["failed"] += 1
            elif verdict is None:
                votes[order]["unparsable"] += 1
                if len(unparsable_examples) < 3:
                    unparsable_examples.append(reply[:200])
            else:
                votes[order][verdict] += 1
            verdicts[order] = {"reply": reply, "verdict": verdict}
            outcomes[order] = outcome(order, verdict)
            votes_as[order][outcomes[order]] += 1
        first, second = outcomes.values()
        consistent += first == second
        final = {"refined": "win", "original": "loss"}.get(first, "tie") if first == second \
            else "tie"
        tally[final] += 1
        categories.setdefault(q["category"], Counter({"win": 0, "tie": 0, "loss": 0}))[final] += 1
        rows.append({"id": q["id"], "category": q["category"], "question": q["instruction"],
                     "original_answer": original_answer, "refined_answer": refined_answer,
                     "verdicts": verdicts, "result": final})
    judged = len(pairs)
    wins, ties, losses = tally["win"], tally["tie"], tally["loss"]
    decisive_a = sum(v["A"] for v in votes.values())
    decisive = decisive_a + sum(v["B"] for v in votes.values())
    return {
        "judged": judged, "wins": wins, "ties": ties, "losses": losses,
        "win_rate": rate(wins, judged),
        "loss_rate": rate(losses, judged),
        "win_rate_ties_half": round((wins + ties / 2) / judged, 4) if judged else None,
        "decisive_win_rate": rate(wins, wins + losses),
        "position_consistency_rate": rate(consistent, judged),
        "votes": {order: dict(v) for order, v in votes.items()},
        "votes_as": {order: dict(v) for order, v in votes_as.items()},
        "position_a_share_of_decisive_votes": rate(decisive_a, decisive),
        "unparsable_verdicts": sum(v["unparsable"] for v in votes.values()),
        "failed_judge_calls": sum(v["failed"] for v in votes.values()),
        "unparsable_examples": unparsable_examples,
        "by_category": {c: {"judged": sum(t.values()), "wins": t["win"], "ties": t["tie"],
                            "losses": t["loss"]} for c, t in sorted(categories.items())},
        "rows": rows,
    }


# ------------------------------------------------------------------ main


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(),
                            "load_average_1min_at_start": load_average()}
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=None,
                        help="the first N shipped questions (default: all 80)")
    parser.add_argument("--questions-file", type=Path, default=QUESTIONS,
                        help="MT-Bench-format JSONL (question_id, category, turns)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="most tokens per refinement and per answer")
    parser.add_argument("--judge-max-tokens", type=int, default=8,
                        help="most tokens per verdict (the judge is asked for one letter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", type=Path, default=None, metavar="FILE.yaml",
                        help="`engines:` mapping with keys refine/answer/judge")
    parser.add_argument("--refine-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a field of the refine step (VALUE is YAML), e.g. "
                        "checks=false; repeatable")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--details", type=Path, default=None, metavar="FILE.jsonl",
                        help="write each judged question (answers, replies, result) here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the refine job's input and output here")
    args = parser.parse_args()
    if args.max_tokens <= 0 or args.judge_max_tokens <= 0:
        parser.error("--max-tokens and --judge-max-tokens must be positive")
    options: dict[str, Any] = {}
    for item in args.refine_option:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            parser.error(f"--refine-option {item!r}: expected FIELD=VALUE")
        if field.strip() in ("kind", "engine"):
            parser.error(f"--refine-option {field.strip()}: fixed by the harness")
        options[field.strip()] = yaml.safe_load(value)
    args.refine_option = options
    return args


def main() -> int:
    args = parse_args()
    from augment_ray.engines.model_files import model_display_name
    from augment_ray.errors import AugmentRayError

    total_started = time.perf_counter()
    machine = machine_info()
    try:
        step = refine_step(args.refine_option, args.max_tokens, args.seed)
        raw, specs = load_engines(args.engines, step)
    except AugmentRayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sampling = {role: specs[role].sampling.model_copy(update={
        "max_tokens": args.judge_max_tokens if role == "judge" else args.max_tokens,
        "seed": args.seed}) for role in ROLES}
    questions = load_questions(args.questions_file, args.questions)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="augment_ray_bench_winrate_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"refining {len(questions)} questions ({model_display_name(specs['refine'].model)})")
        refine = run_refine(questions, raw["refine"], step, work)
        log(f"kept {len(refine['refined'])}, rejected {len(refine['rejected'])} "
            f"({refine['seconds']:.1f}s); answering and judging")
        judged = answer_and_judge(questions, refine["refined"], specs, sampling)
    except AugmentRayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    scored = score(judged["pairs"], judged["by_order"])
    rows = scored.pop("rows")
    n = len(questions)
    result: dict[str, Any] = {
        "benchmark": "refine_winrate",
        "n": n,
        "questions": {"source": str(args.questions_file.resolve().relative_to(ROOT))
                      if args.questions_file.resolve().is_relative_to(ROOT)
                      else str(args.questions_file), "turn": 1,
                      "categories": dict(sorted(Counter(q["category"] for q in questions)
                                                .items()))},
        "engines": {role: {"kind": specs[role].kind,
                           "model": model_display_name(specs[role].model),
                           "default_bundled": raw[role] == DEFAULT_ENGINE,
                           "spec": specs[role].model_dump(mode="json", exclude={"sampling"}),
                           "sampling": sampling[role].model_dump(mode="json")}
                    for role in ROLES},
        "settings": {"max_tokens": args.max_tokens, "judge_max_tokens": args.judge_max_tokens,
                     "seed": args.seed, "judge_template": JUDGE_TEMPLATE.name,
                     "refine_step": step},
        "refinements": {
            "kept": len(refine["refined"]), "rejected": len(refine["rejected"]),
            "rejected_by_reason": dict(sorted(Counter(
                reason for reason, _ in refine["rejected"].values()).items())),
            "reject_examples": [{"id": i, "reason": r, "detail": d}
                                for i, (r, d) in list(refine["rejected"].items())[:3]],
            "identical_to_original": sum(
                refine["refined"][q["id"]].strip() == q["instruction"].strip()
                for q in questions if q["id"] in refine["refined"]),
            "truncated_at_max_tokens": refine["truncated"],
        },
        "answers": {"questions_failed": len(judged["failed"]),
                    "failed_by_reason": dict(Counter(judged["failed"].values())),
                    "truncated_at_max_tokens": judged["answer_truncated"]},
        **scored,
        "timings": {
            "refine_job_seconds": round(refine["seconds"], 2),
            "refine_job_wall_seconds_in_summary": refine["summary_wall_seconds"],
            "engine_load_seconds": judged["load_seconds"],
            "answer_seconds": round(judged["answer_seconds"], 2),
            "judge_seconds": round(judged["judge_seconds"], 2),
            "total_seconds": round(time.perf_counter() - total_started, 2),
        },
        "tokens": {
            "refine": {"prompt_tokens": refine["prompt_tokens"],
                       "completion_tokens": refine["completion_tokens"]},
            "answer": judged["answer_tokens"], "judge": judged["judge_tokens"],
        },
        "examples": [{k: r[k] for k in ("id", "question", "result")}
                     | {"refined": refine["refined"][r["id"]],
                        "replies": {o: v["reply"] for o, v in r["verdicts"].items()}}
                     for r in rows[:3]],
        "machine": {**machine, "load_average_1min_at_end": load_average()},
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.details:
        args.details.parent.mkdir(parents=True, exist_ok=True)
        args.details.write_text("".join(
            json.dumps({**r, "refined": refine["refined"][r["id"]]}, ensure_ascii=False) + "\n"
            for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
