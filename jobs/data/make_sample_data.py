"""Rebuilds the bundled sample: the 175 Self-Instruct seed tasks as two Parquet shards.

Source: ../shared/data/self_instruct_seed_tasks.jsonl (Apache-2.0, see LICENSE-self-instruct.md).
Usage: python jobs/data/make_sample_data.py [SOURCE_JSONL]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
DEFAULT_SOURCE = HERE / "../../../shared/data/self_instruct_seed_tasks.jsonl"
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
TARGET = HERE / "self_instruct_seed"
SHARDS = 2


def main() -> None:
    rows = []
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        first = task["instances"][0]
        rows.append({
            "id": task["id"],
            "name": task["name"],
            "instruction": task["instruction"],
            "input": first["input"],
            "output": first["output"],
            "is_classification": task["is_classification"],
        })
    TARGET.mkdir(exist_ok=True)
    per_shard = -(-len(rows) // SHARDS)
    for shard in range(SHARDS):
        chunk = rows[shard * per_shard : (shard + 1) * per_shard]
        pq.write_table(pa.Table.from_pylist(chunk), TARGET / f"part-{shard:05d}.parquet")
    print(f"wrote {len(rows)} rows in {SHARDS} shards to {TARGET}")


if __name__ == "__main__":
    main()
