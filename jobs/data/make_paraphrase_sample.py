"""Builds jobs/data/seed_with_paraphrases: the 175 seed tasks plus planted paraphrases, so the
dedup_semantic example job has rewordings to remove that MinHash (dedup_near) does not see.

Planted (deterministic, seed 11): 24 paraphrases of seed instructions (synonyms, a leading
clause moved to the end, a request frame such as "Please ..." or "Could you ...?"), 6
paraphrases of those paraphrases (chains: A ~ B ~ C), all from tasks whose `input` is short or
empty, so the reworded instruction is most of the compared text. The `input` and `output` of a
planted row are its source's. The source rows are the bundled sample (Self-Instruct seed tasks,
Apache-2.0, see LICENSE-self-instruct.md); the planted rows are derived from them under the same
licence. Ids are not given, so the reader makes content ids.

`paraphrase(text, rng)` is also what benchmarks/dedup_semantic.py plants.
Usage: python jobs/data/make_paraphrase_sample.py
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
TARGET = HERE / "seed_with_paraphrases"
SEED = 11

# word -> rewordings with the same meaning in an instruction (lower case; case is restored)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "write": ("compose", "draft"),
    "create": ("make", "produce", "come up with"),
    "make": ("create", "prepare", "put together"),
    "generate": ("produce", "come up with", "create"),
    "give": ("provide", "offer"),
    "find out": ("work out", "figure out"),
    "find": ("identify", "determine"),
    "make up": ("come up with", "invent"),
    "explain": ("describe", "clarify"),
    "describe": ("explain", "outline"),
    "suggest": ("recommend", "propose"),
    "recommend": ("suggest", "propose"),
    "identify": ("find", "pick out"),
    "show": ("demonstrate", "display"),
    "choose": ("pick", "select"),
    "select": ("choose", "pick"),
    "use": ("employ", "utilize"),
    "using": ("employing", "with"),
    "classify": ("categorize", "sort"),
    "summarize": ("sum up", "condense"),
    "rewrite": ("rephrase", "reword"),
    "convert": ("transform", "change"),
    "provide": ("give", "supply"),
    "help": ("assist", "aid"),
    "following": ("below",),
    "given": ("provided",),
    "text": ("passage",),
    "paragraph": ("passage",),
    "question": ("query",),
    "story": ("tale", "narrative"),
    "example": ("instance", "sample"),
    "examples": ("instances", "samples"),
    "list of": ("set of", "collection of"),
    "short": ("brief", "concise"),
    "simple": ("easy", "basic"),
    "good": ("nice", "decent"),
    "best": ("finest", "top"),
    "important": ("key", "significant"),
    "different": ("distinct", "various"),
    "people": ("individuals",),
    "some": ("a few", "several"),
    "possible": ("potential", "feasible"),
    "about": ("regarding", "concerning"),
    "word": ("term",),
    "words": ("terms",),
    "reason": ("rationale",),
    "task": ("job", "assignment"),
    "fun": ("entertaining", "amusing"),
    "healthy": ("nutritious", "wholesome"),
    "how many": ("what number of",),
    "buys": ("purchases",),
    "bought": ("purchased",),
    "buy": ("purchase",),
    "wants": ("would like",),
    "needs": ("requires",),
    "total": ("overall", "combined"),
    "store": ("shop",),
    "money": ("cash",),
    "price": ("cost",),
    "kids": ("children",),
    "children": ("kids",),
    "started": ("began",),
    "starts": ("begins",),
    "finished": ("completed",),
    "remaining": ("left over",),
    "gave": ("handed",),
    "gets": ("receives",),
    "car": ("vehicle",),
    "house": ("home",),
    "friends": ("pals",),
    "friend": ("pal",),
    "every": ("each",),
    "large": ("big",),
    "big": ("large",),
    "small": ("little",),
}
# a leading clause that can move to the end: "Given X, do Y." -> "Do Y, given X."
LEADING = re.compile(r"^((?:given|if|when|based on|using|for|in|after|before|as|since|"
                     r"assuming|with)\b[^,]{3,80}),\s+(.+?)([.?!:]?)$", re.IGNORECASE)
IMPERATIVE = {"write", "create", "make", "generate", "give", "find", "explain", "describe",
              "suggest", "recommend", "list", "identify", "tell", "show", "choose", "select",
              "classify", "summarize", "rewrite", "convert", "answer", "provide", "help",
              "brainstorm", "plan", "compose", "come", "extract", "add", "design", "translate",
              "predict", "sort", "solve", "name", "return", "detect", "analyze", "reply"}
FRAMES = ("Please {}.", "Could you {}?", "I would like you to {}.", "Can you {}?",
          "Your task is to {}.", "I need you to {}.")
FALLBACKS = ("Here is my request: {}", "Request: {}", "Help me with this: {}")


def _restore_case(original: str, new: str) -> str:
    return new[:1].upper() + new[1:] if original[:1].isupper() else new


def _synonyms(text: str, rng: random.Random, share: float) -> str:
    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        choices = SYNONYMS.get(word.lower())
        if not choices or rng.random() > share:
            return word
        return _restore_case(word, rng.choice(choices))

    keys = sorted(SYNONYMS, key=len, reverse=True)  # "list of" before "list"
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keys) + r")\b", re.I)
    return pattern.sub(swap, text)


def _move_leading_clause(text: str) -> str:
    match = LEADING.match(text.strip())
    if not match:
        return text
    clause, rest, end = match.groups()
    clause = clause[:1].lower() + clause[1:]
    return f"{rest[:1].upper()}{rest[1:]}, {clause}{end or '.'}"


def _frame(text: str, rng: random.Random) -> str:
    words = text.split()
    if not words or words[0].lower() not in IMPERATIVE:
        return text
    body = text.strip().rstrip(".!:")
    if "?" in body or ". " in body:  # several sentences: a frame would read wrong
        return text
    return rng.choice(FRAMES).format(body[:1].lower() + body[1:])


def paraphrase(text: str, rng: random.Random) -> str:
    """A rewording of an instruction with the same meaning: synonyms for most words of a small
    list, a leading clause moved to the end, a request frame; always changes the text."""
    out = _synonyms(text, rng, share=0.8)
    if rng.random() < 0.7:
        out = _move_leading_clause(out)
    if rng.random() < 0.7:
        out = _frame(out, rng)
    if out == text:  # nothing applied: at least frame it as a request
        out = rng.choice(FALLBACKS).format(text)
    return out


def main() -> None:
    rng = random.Random(SEED)
    seeds = pq.read_table(HERE / "self_instruct_seed").select(["instruction", "input", "output"])
    rows = seeds.to_pylist()
    short_input = [r for r in rows if len(r["input"] or "") <= 40]
    first = [{**row, "instruction": paraphrase(row["instruction"], rng)}
             for row in rng.sample(short_input, 24)]
    second = [{**row, "instruction": paraphrase(row["instruction"], rng)}
              for row in rng.sample(first, 6)]
    everything = rows + first + second
    rng.shuffle(everything)
    TARGET.mkdir(exist_ok=True)
    half = len(everything) // 2
    for index, part in enumerate((everything[:half], everything[half:])):
        pq.write_table(pa.Table.from_pylist(part), TARGET / f"part-{index:05d}.parquet")
    print(f"wrote {len(everything)} rows ({len(first) + len(second)} planted) to {TARGET}")


if __name__ == "__main__":
    main()
