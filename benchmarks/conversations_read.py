"""Reading conversations: the input reader's cost per row against raw pyarrow, in one process.

Builds N rows from real text in ../shared/data (GSM8K problems and answers as exchanges, 1 to 3
per conversation, a system turn on every third), written as Parquet shards twice: as an OpenAI
`messages` column, and as single-turn instruction/output rows of the same text (the first
exchange). Then, on the same files in one run:
  pyarrow_read        pq.read_table of every shard (the floor: decode only)
  ours_single_turn    the reader's read_shards (rename, type checks, ids, reject checks)
  ours_messages       the same on the conversations: every turn checked, the messages column
                      and the derived instruction/output built, content ids over the turns
and prints one JSON object: rows/s of each and the ratios to pyarrow and to single-turn rows.

Usage: python benchmarks/conversations_read.py [--rows 200000] [--shards 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from augment_ray.config.io import InputSpec
from augment_ray.io.read import list_input_shards, read_shards

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"


def exchanges() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [(row["question"], row["answer"]) for row in rows]


def build(n: int, shards: int, folder: Path) -> tuple[Path, Path]:
    pairs = exchanges()
    rng = random.Random(0)
    chats, singles = [], []
    for i in range(n):
        picked = [pairs[rng.randrange(len(pairs))] for _ in range(1 + i % 3)]
        turns = [{"role": "system", "content": "Solve step by step."}] if i % 3 == 0 else []
        for question, answer in picked:
            turns += [{"role": "user", "content": question},
                      {"role": "assistant", "content": answer}]
        chats.append({"id": f"c{i}", "messages": turns})
        singles.append({"id": f"s{i}", "instruction": picked[0][0], "output": picked[0][1]})
    paths = folder / "messages", folder / "single"
    for path, rows in zip(paths, (chats, singles), strict=True):
        path.mkdir()
        per = -(-n // shards)
        for k in range(shards):
            pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per]),
                           path / f"part-{k:05d}.parquet")
    return paths


def timed_read(uri: Path) -> tuple[int, float]:
    spec = InputSpec(uri=str(uri))
    shards = list_input_shards(spec)
    batch = pa.table({"path": [s.path for s in shards], "format": [s.format for s in shards]})
    started = time.perf_counter()
    rows = sum(len(t) for t in read_shards(batch, spec))
    return rows, time.perf_counter() - started


def timed_pyarrow(uri: Path) -> tuple[int, float]:
    started = time.perf_counter()
    rows = sum(pq.read_table(f).num_rows for f in sorted(uri.glob("*.parquet")))
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conv-read-") as tmp:
        messages, single = build(args.rows, args.shards, Path(tmp))
        timed_read(single)  # warm-up: imports, page cache
        runs: dict[str, Any] = {}
        for name, run, uri in (("pyarrow_read", timed_pyarrow, messages),
                               ("ours_single_turn", timed_read, single),
                               ("ours_messages", timed_read, messages)):
            rows, seconds = run(uri)
            runs[name] = {"rows": rows, "seconds": round(seconds, 2),
                          "rows_per_s": round(rows / seconds)}
    base = runs["pyarrow_read"]["rows_per_s"]
    result = {
        "benchmark": "conversation_input_read",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "shards": args.shards, "runs": runs,
        "ratio_messages_to_pyarrow": round(runs["ours_messages"]["rows_per_s"] / base, 3),
        "ratio_single_turn_to_pyarrow": round(runs["ours_single_turn"]["rows_per_s"] / base, 3),
        "ratio_messages_to_single_turn": round(runs["ours_messages"]["rows_per_s"]
                                               / runs["ours_single_turn"]["rows_per_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
