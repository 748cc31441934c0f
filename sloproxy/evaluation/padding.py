"""Context text that brings a prompt to the trace's input size, counted with the emulator's own rule.

The text is made of whole instructions from the dataset, one per line (realistic enough for a
length predictor to ignore, cheap to build). Each piece's token count is known in advance and a
newline between two stripped pieces is exactly one token under ``sloproxy.emulator.tokens``, so a
passage of N tokens is assembled without re-tokenising it; the last piece is cut at a token
boundary. Same random state, same budget: same text, and a smaller budget gives a prefix of it,
which is what lets Mooncake requests that share prompt blocks share a prefix here too.
"""

from __future__ import annotations

import random

from ..emulator.tokens import count_tokens, tokenize


class ContextFiller:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = [p.strip() for p in pieces if p.strip()]
        if not self.pieces:
            raise ValueError("no text to pad prompts with")
        self.counts = [count_tokens(p) for p in self.pieces]

    def fill(self, rng: random.Random, tokens: int) -> str:
        """About ``tokens`` tokens of context (exact unless the cut lands on a whitespace token)."""
        return self.fill_counted(rng, tokens)[0]

    def fill_counted(self, rng: random.Random, tokens: int) -> tuple[str, int]:
        """The context and its exact token count (what :meth:`fill` returns, without recounting)."""
        parts: list[str] = []
        total = 0
        while total < tokens:
            index = rng.randrange(len(self.pieces))
            separator = 1 if parts else 0
            room = tokens - total - separator
            if room <= 0:
                break
            if self.counts[index] <= room:
                parts.append(self.pieces[index])
                total += separator + self.counts[index]
            else:
                cut = "".join(tokenize(self.pieces[index])[:room]).rstrip()
                if cut:
                    parts.append(cut)
                    total += separator + count_tokens(cut)
                break
        return "\n".join(parts), total
