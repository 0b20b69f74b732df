"""Rebuilds the bundled eval samples in jobs/data/eval/ (see eval/LICENSE.md): the first 200
GSM8K test problems and all 80 MT-Bench questions, copied line for line.

Source: ../shared/data/{gsm8k_test,mt_bench_questions}.jsonl.
Usage: python jobs/data/make_eval_samples.py [SOURCE_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "../../../shared/data"
TARGET = HERE / "eval"
SAMPLES = {  # target file: (source file, lines kept; None = all)
    "gsm8k_test_200.jsonl": ("gsm8k_test.jsonl", 200),
    "mt_bench_questions.jsonl": ("mt_bench_questions.jsonl", None),
}


def main() -> None:
    TARGET.mkdir(exist_ok=True)
    for target, (source, keep) in SAMPLES.items():
        lines = (SOURCE / source).read_text(encoding="utf-8").splitlines(keepends=True)
        (TARGET / target).write_text("".join(lines[:keep]), encoding="utf-8")
        print(f"wrote {len(lines[:keep])} lines to {TARGET / target}")


if __name__ == "__main__":
    main()
