"""Rebuilds jobs/data/llm2llm/: a 1% GSM8K seed split for the LLM2LLM demo (every 100th of the
7,473 training problems, 75 rows, with ids gsm8k-train-NNNN) as seeds.jsonl, and the first 40
GSM8K test problems as eval.jsonl. GSM8K is MIT-licensed (see LICENSE-gsm8k.md).

Source: ../shared/data/gsm8k_{train,test}.jsonl.
Usage: python jobs/data/make_llm2llm_sample.py [SOURCE_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "../../../shared/data"
TARGET = HERE / "llm2llm"
EVERY = 100
EVAL_ROWS = 40


def main() -> None:
    TARGET.mkdir(exist_ok=True)
    lines = (SOURCE / "gsm8k_train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [{"id": f"gsm8k-train-{i:04d}", **json.loads(line)}
            for i, line in enumerate(lines) if i % EVERY == 0]
    with (TARGET / "seeds.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} seeds to {TARGET / 'seeds.jsonl'}")
    test = (SOURCE / "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (TARGET / "eval.jsonl").write_text("".join(test[:EVAL_ROWS]), encoding="utf-8")
    print(f"wrote {EVAL_ROWS} eval rows to {TARGET / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
