"""Builds jobs/data/seed_with_duplicates: the 175 seed tasks plus planted duplicates, so the
dedup example jobs have something to remove.

Planted (deterministic): 20 exact copies with case or whitespace changes, 20 near copies (one
word changed or two adjacent words swapped) and 10 copies of those near copies. The source rows
are the bundled sample (Apache-2.0, see LICENSE-self-instruct.md). Ids are not given, so the
reader makes content ids. Usage: python jobs/data/make_dup_sample.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
TARGET = HERE / "seed_with_duplicates"


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.randrange(max(len(words) - 1, 1))
    if rng.random() < 0.5 and len(words) > 1:
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        words[i] = rng.choice(["some", "the", "any", "a few", "several"])
    return " ".join(words)


def main() -> None:
    rng = random.Random(7)
    seeds = pq.read_table(HERE / "self_instruct_seed").select(["instruction", "input", "output"])
    rows = seeds.to_pylist()
    long_rows = [r for r in rows if len(r["instruction"].split()) >= 12]
    planted = []
    for row in rng.sample(rows, 20):
        text = row["instruction"]
        text = text.upper() if rng.random() < 0.5 else "  " + text.replace(" ", "  ")
        planted.append({**row, "instruction": text})
    near = [{**row, "instruction": near_copy(row["instruction"], rng)}
            for row in rng.sample(long_rows, 20)]
    planted += near
    planted += [{**row, "instruction": near_copy(row["instruction"], rng)}
                for row in rng.sample(near, 10)]
    everything = rows + planted
    rng.shuffle(everything)
    TARGET.mkdir(exist_ok=True)
    half = len(everything) // 2
    for index, part in enumerate((everything[:half], everything[half:])):
        pq.write_table(pa.Table.from_pylist(part), TARGET / f"part-{index:05d}.parquet")
    print(f"wrote {len(everything)} rows ({len(planted)} planted) to {TARGET}")


if __name__ == "__main__":
    main()
