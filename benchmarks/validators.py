"""The generating steps' checks against hand labels: precision and recall of each check, and
the cosine thresholds swept, on benchmarks/data/validator_labels.jsonl; plus how many of a
committed refine output's rewrites pass.

    python benchmarks/validators.py [--labels FILE] [--refined OUTPUT_DIR] [--out FILE.json]

Prints JSON. "invalid" is the positive class: a check's precision is the share of the rows it
rejects that the labels call invalid, its recall the share of the rows labelled with its reason
that it rejects (any check rejecting them counts for the family's recall). The baseline is
today's behaviour without checks: keep every parsable answer (precision undefined, recall 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment_ray.engines.embedding_engine import EmbeddingEngineSpec  # noqa: E402
from augment_ray.tasks.base import detect_language, load_template  # noqa: E402
from augment_ray.validate.checks import (  # noqa: E402
    Candidate,
    Checks,
    NewInstructionChecks,
    ResponseChecks,
    RewriteChecks,
)
from augment_ray.validate.embedder import process_embedder  # noqa: E402

LABELS = ROOT / "benchmarks" / "data" / "validator_labels.jsonl"
TEMPLATES = {"refine": "refine", "expand": "expand"}
SWEEP = [round(0.05 * i, 2) for i in range(0, 20)]


def candidates(family: str, rows: list[dict[str, Any]]) -> tuple[list[Candidate], list[int]]:
    """The candidates to judge (with each expand row's sibling kept before it), and the index
    of each labelled row's verdict among them."""
    out: list[Candidate] = []
    judged: list[int] = []
    for i, row in enumerate(rows):
        template = (load_template(TEMPLATES[family], "v1", detect_language(row["source"])).text
                    if family in TEMPLATES else None)
        if row.get("sibling"):
            out.append(Candidate(row["source"], row["sibling"], group=i, kept=True))
        judged.append(len(out))
        out.append(Candidate(row["source"], row["candidate"], group=i, template=template))
    return out, judged


def verdicts(checks: Checks, family: str, rows: list[dict[str, Any]], embed: Any
             ) -> list[str | None]:
    cands, judged = candidates(family, rows)
    found = checks.check(cands, embed)
    return [found[i][0] if found[i] else None for i in judged]


def scores(rows: list[dict[str, Any]], predicted: list[str | None]) -> dict[str, Any]:
    invalid = [not r["valid"] for r in rows]
    flagged = [p is not None for p in predicted]
    tp = sum(a and b for a, b in zip(invalid, flagged, strict=True))
    result: dict[str, Any] = {
        "rows": len(rows), "labelled_invalid": sum(invalid), "rejected": sum(flagged),
        "precision": round(tp / sum(flagged), 3) if any(flagged) else None,
        "recall": round(tp / sum(invalid), 3) if any(invalid) else None,
        "accuracy": round(sum(a == b for a, b in zip(invalid, flagged, strict=True))
                          / len(rows), 3),
        "checks": {},
    }
    for reason in sorted({p for p in predicted if p} | {r["reason"] for r in rows if r["reason"]}):
        mine = [p == reason for p in predicted]
        labelled = [r["reason"] == reason for r in rows]
        hits = sum(m and i for m, i in zip(mine, invalid, strict=True))
        caught = sum(lab and f for lab, f in zip(labelled, flagged, strict=True))
        exact = sum(lab and m for lab, m in zip(labelled, mine, strict=True))
        result["checks"][reason] = {
            "rejected": sum(mine), "labelled": sum(labelled),
            # of the rows this check rejected, the share labelled invalid (for any reason)
            "precision": round(hits / sum(mine), 3) if any(mine) else None,
            # of the rows labelled with this reason, the share rejected by any check / by this one
            "recall": round(caught / sum(labelled), 3) if any(labelled) else None,
            "recall_same_reason": round(exact / sum(labelled), 3) if any(labelled) else None,
        }
    return result


def f1(rows: list[dict[str, Any]], predicted: list[str | None]) -> float:
    s = scores(rows, predicted)
    p, r = s["precision"] or 0.0, s["recall"] or 0.0
    return round(2 * p * r / (p + r), 3) if p + r else 0.0


def sweep(family: str, rows: list[dict[str, Any]], embed: Any) -> dict[str, Any]:
    """F1 of the family's checks as each cosine threshold moves, the others at their default."""
    base: dict[str, Checks] = {"refine": RewriteChecks(), "expand": NewInstructionChecks(),
                               "respond": ResponseChecks()}
    fields = {"refine": ["min_similarity"], "respond": ["min_similarity", "max_similarity"],
              "expand": ["min_similarity", "max_similarity", "max_sibling_similarity"]}[family]
    out: dict[str, Any] = {}
    for name in fields:
        out[name] = {str(v): f1(rows, verdicts(base[family].model_copy(update={name: v}),
                                               family, rows, embed))
                     for v in SWEEP + ([0.95, 0.98] if name.startswith("max") else [])}
    return out


def refined_output(folder: Path, embed: Any) -> dict[str, Any]:
    """How many rewrites of a committed refine output pass the checks, by reason."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(folder / "data"), format="parquet").to_table()
    rows = [{"source": r["instruction"], "candidate": r["refined_instruction"]}
            for r in table.to_pylist() if r.get("refined_instruction")]
    found = verdicts(RewriteChecks(), "refine", rows, embed)
    return {"rewrites": len(rows), "kept": sum(f is None for f in found),
            "rejected": dict(Counter(f for f in found if f))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--refined", type=Path, default=None,
                        help="a committed refine output (before checks) to count passing rewrites")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    model = process_embedder(EmbeddingEngineSpec())
    loaded = time.perf_counter() - started
    memo: dict[str, Any] = {}

    def embed(texts: list[str]) -> Any:  # the sweep asks for the same texts again and again
        todo = [t for t in dict.fromkeys(texts) if t not in memo]
        if todo:
            memo.update(zip(todo, model(todo), strict=True))
        return np.stack([memo[t] for t in texts])
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in args.labels.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_family[row["family"]].append(row)
    defaults: dict[str, Checks] = {"refine": RewriteChecks(), "expand": NewInstructionChecks(),
                                   "respond": ResponseChecks()}
    report: dict[str, Any] = {"labels": str(args.labels.relative_to(ROOT)
                                            if args.labels.is_relative_to(ROOT) else args.labels),
                              "embedder": "all-MiniLM-L6-v2", "embedder_load_s": round(loaded, 2),
                              "families": {}}
    for family, rows in sorted(by_family.items()):
        timed = time.perf_counter()
        predicted = verdicts(defaults[family], family, rows, embed)
        seconds = time.perf_counter() - timed
        report["families"][family] = {
            "checks": scores(rows, predicted),
            # the baseline: no checks, every parsable answer kept
            "baseline_keep_all": scores(rows, [None] * len(rows)),
            "rows_per_s": round(len(rows) / seconds, 1) if seconds else None,
            "threshold_sweep_f1": sweep(family, rows, embed),
            "origin": dict(Counter(r.get("origin", "?") for r in rows)),
        }
    if args.refined:
        report["refined_output"] = refined_output(args.refined, embed)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
