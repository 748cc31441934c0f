"""The state the scheduler shares across replicas, as one interface.

What lives here must be global when several proxy replicas serve one fleet: the in-flight
ledger per backend (who holds which reservation, with how many tokens), each backend's
dispatch budget, tenants' fair-share counters, and queue depths per class and model. A
replica keeps a local view for its hot path (policies read ``backend.in_flight``); the state
is the source of truth. Every change is one call, so a Redis implementation can make each
one atomic (a Lua script) with leases that expire when a replica dies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class SchedulerState(ABC):
    @abstractmethod
    def reserve(self, backend: str, request_id: str, tokens: int) -> int:
        """Record a dispatch; returns the backend's in-flight count after it."""

    @abstractmethod
    def release(self, backend: str, request_id: str) -> int:
        """Drop a reservation (idempotent); returns the backend's in-flight count after it."""

    @abstractmethod
    def in_flight(self, backend: str) -> int: ...

    @abstractmethod
    def reserved_tokens(self, backend: str) -> int: ...

    @abstractmethod
    def budget(self, backend: str, default: int) -> int: ...

    @abstractmethod
    def set_budget(self, backend: str, budget: int) -> None: ...

    @abstractmethod
    def add_tenant_tokens(self, tenant: str, tokens: int) -> int:
        """Count tokens served to a tenant; returns its total."""

    @abstractmethod
    def tenant_tokens(self, tenant: str) -> int: ...

    @abstractmethod
    def queue_changed(self, model: str, slo_class: str, delta: int) -> None: ...

    @abstractmethod
    def queue_depths(self) -> dict[tuple[str, str], int]:
        """Waiting requests by (model, class)."""
