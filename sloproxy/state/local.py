"""Embedded in-process state: one replica, nothing to install."""

from __future__ import annotations

from collections import Counter, defaultdict

from .base import SchedulerState


class LocalState(SchedulerState):
    def __init__(self) -> None:
        self._reservations: dict[str, dict[str, int]] = defaultdict(dict)  # backend -> request id -> tokens
        self._budgets: dict[str, int] = {}
        self._tenants: Counter[str] = Counter()
        # (model, class) -> requests waiting; a plain dict, as a Counter's missing key and deletion are
        # Python-level methods (each request leaving its queue passes here: a dispatch decision)
        self._queues: dict[tuple[str, str], int] = {}

    def reserve(self, backend: str, request_id: str, tokens: int) -> int:
        held = self._reservations[backend]
        held[request_id] = tokens
        return len(held)

    def release(self, backend: str, request_id: str) -> int:
        held = self._reservations[backend]
        held.pop(request_id, None)
        return len(held)

    def in_flight(self, backend: str) -> int:
        return len(self._reservations[backend])

    def reserved_tokens(self, backend: str) -> int:
        return sum(self._reservations[backend].values())

    def budget(self, backend: str, default: int) -> int:
        return self._budgets.get(backend, default)

    def set_budget(self, backend: str, budget: int) -> None:
        self._budgets[backend] = budget

    def add_tenant_tokens(self, tenant: str, tokens: int) -> int:
        self._tenants[tenant] += tokens
        return self._tenants[tenant]

    def tenant_tokens(self, tenant: str) -> int:
        return self._tenants[tenant]

    def queue_changed(self, model: str, slo_class: str, delta: int) -> None:
        key = (model, slo_class)
        count = self._queues.get(key, 0) + delta
        if count > 0:
            self._queues[key] = count
        else:
            self._queues.pop(key, None)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        return dict(self._queues)
