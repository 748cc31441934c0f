"""Where an emulated reply's length comes from.

In order: a lengths file (exact replay of a workload's true reply lengths), then
``ignore_eos`` with a token limit (exactly that many), then a deterministic draw from a
log-normal seeded by the prompt (median 129, p99 ≈ 600 tokens: the Azure conversation
trace's reply shape). The token limit and the context window always cap the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

from .tokens import render_chat

MEDIAN_REPLY_TOKENS = 129.0
REPLY_SIGMA = 0.66  # ln(p99 / p50) / 2.326 for the Azure conv trace (601 / 129)


def prompt_key(text: str) -> str:
    """Key a prompt for lengths files: first 16 hex digits of the SHA-256 of its rendered text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def prompt_text(record: dict) -> str | None:
    """The rendered prompt of a workload record (chat ``messages`` or completion ``prompt``)."""
    if isinstance(record.get("messages"), list):
        return render_chat(record["messages"])
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    return None


class LengthTable:
    """Prompt key -> true reply length, read from a JSONL file.

    Each line is either a workload record (``messages`` or ``prompt`` plus ``output_tokens``)
    or ``{"prompt_hash": KEY, "output_tokens": N}`` with ``KEY`` from :func:`prompt_key`.
    """

    def __init__(self, lengths: dict[str, int] | None = None) -> None:
        self._lengths = dict(lengths or {})

    @classmethod
    def load(cls, path: str | Path) -> LengthTable:
        lengths: dict[str, int] = {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                tokens = record.get("output_tokens")
                if not isinstance(tokens, int) or tokens < 0:
                    raise ValueError(f"{path}:{number}: output_tokens must be a non-negative integer")
                key = record.get("prompt_hash")
                if key is None:
                    text = prompt_text(record)
                    if text is None:
                        raise ValueError(f"{path}:{number}: needs prompt_hash, messages or prompt")
                    key = prompt_key(text)
                lengths[str(key)] = tokens
        return cls(lengths)

    def __len__(self) -> int:
        return len(self._lengths)

    def get(self, key: str) -> int | None:
        return self._lengths.get(key)


def seeded_length(key: str) -> int:
    """A deterministic reply length drawn from the log-normal, seeded by the prompt key."""
    rng = random.Random(key)
    return max(1, round(math.exp(math.log(MEDIAN_REPLY_TOKENS) + REPLY_SIGMA * rng.gauss(0.0, 1.0))))


def reply_length(
    key: str, max_new_tokens: int, *, ignore_eos: bool, table: LengthTable | None, min_tokens: int = 0
) -> tuple[int, bool]:
    """Return (tokens to generate, hit the limit) for one request.

    ``hit the limit`` means the reply stops because of ``max_new_tokens`` (finish reason
    ``length``) rather than by itself (``stop``).
    """
    if ignore_eos:
        return max_new_tokens, True
    natural = table.get(key) if table is not None else None
    if natural is None:
        natural = seeded_length(key)
    natural = max(natural, min_tokens, 1)
    if natural >= max_new_tokens:
        return max_new_tokens, True
    return natural, False
