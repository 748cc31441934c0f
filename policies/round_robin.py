"""``round-robin``: the nginx / LiteLLM-shuffle baseline. No queue, no load awareness."""

from __future__ import annotations

from collections.abc import Sequence


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[str]) -> str:
        """Rotate over ``candidates`` in order; raises ``ValueError`` when there are none."""
        if not candidates:
            raise ValueError("no candidate backend")
        choice = candidates[self._turn % len(candidates)]
        self._turn += 1
        return choice
