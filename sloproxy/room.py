"""Which backends of each model are below their most permissive cap, kept as the caps and counts change.

With a long queue the fleet is at its budget, and a dispatch decision follows a release that freed one
slot on one backend. Finding that backend by reading every backend of the model (64 attribute
comparisons on every release) was the largest part of a decision at 10,000 waiting and 64 backends
(``bench/scheduler_decision.py``). The scheduler is the only writer of what a backend's room depends
on (``mine``: what this replica holds on it; ``urgent_cap``: what it may hold, the cap of band-0
work and the most permissive), so it tells this index after each change and a decision reads only
the backends the index lists. Health is read when listing: it changes outside the scheduler (health
checks, the breaker, drains), and a backend's health does not change which backends are below cap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Backend


class RoomIndex:
    """Per model, the positions in its serving list (``BackendPool.by_model``) of the backends whose
    ``mine < urgent_cap``. Call :meth:`update` after changing a backend's ``mine`` or caps."""

    def __init__(self, by_model: Mapping[str, Sequence[Backend]]) -> None:
        self._serving = by_model
        self._below: dict[str, set[int]] = {model: set() for model in by_model}
        # backend -> its (model's set of positions, its position there): one entry per serving list it is in
        self._places: dict[Backend, list[tuple[set[int], int]]] = {}
        for model, backends in by_model.items():
            for index, backend in enumerate(backends):
                self._places.setdefault(backend, []).append((self._below[model], index))

    def update(self, backend: Backend) -> None:
        """``backend``'s ``mine`` or ``urgent_cap`` may have changed: list it where it is below cap."""
        below = backend.mine < backend.urgent_cap
        for positions, index in self._places.get(backend, ()):
            if below:
                positions.add(index)
            else:
                positions.discard(index)

    def with_room(self, model: str) -> list[Backend]:
        """The healthy backends serving ``model`` below their urgent cap, in the serving list's order
        (the order admission and routing see them in): what ``[b for b in serving if b.mine <
        b.urgent_cap and b.healthy]`` gives, read from the few listed rather than the fleet."""
        positions = self._below.get(model)
        if not positions:
            return []
        serving = self._serving[model]
        return [b for index in sorted(positions) if (b := serving[index]).healthy]
