"""Policy interfaces. Policies are pure decisions: no I/O, no asyncio inside.

This first part is routing only (which backend serves a request); ordering, admission and
fleet actions join it with the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Router(Protocol):
    """Pick one of ``candidates`` (backend names that are healthy and serve the model)."""

    name: str

    def choose(self, candidates: Sequence[str]) -> str: ...
