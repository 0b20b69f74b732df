"""Text lengths in tokens of the bundled model's tokenizer, or in whitespace words when it cannot
be loaded (the report says which)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

CHUNK = 1024


class TokenCounter:
    def __init__(self, unit: str, note: str,
                 lengths: Callable[[list[str]], list[int]]) -> None:
        self.unit = unit  # "tokens" or "words"
        self.note = note  # how they were counted, for the report
        self._lengths = lengths

    def count(self, texts: Sequence[str | None]) -> list[int]:
        """Lengths of the non-null texts (nulls are left out)."""
        present = [t for t in texts if t is not None]
        out: list[int] = []
        for start in range(0, len(present), CHUNK):
            out += self._lengths(present[start:start + CHUNK])
        return out


def whitespace_counter(reason: str) -> TokenCounter:
    return TokenCounter("words", f"whitespace-separated words ({reason})",
                        lambda texts: [len(t.split()) for t in texts])


def load_counter() -> TokenCounter:
    try:
        from augment_ray.engines.model_files import BUNDLED_NAME, resolve_model_dir

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()  # "sequence longer than max length" noise
        tokenizer = AutoTokenizer.from_pretrained(
            str(resolve_model_dir("bundled", None)), local_files_only=True)
    except Exception as error:  # any failure to load means: count words instead
        log.info("report: tokenizer unavailable (%s); counting words", error)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return whitespace_counter(f"the bundled tokenizer could not be loaded: {first}")

    def lengths(texts: list[str]) -> list[int]:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    return TokenCounter("tokens", f"{BUNDLED_NAME} tokenizer (the bundled model's)", lengths)
