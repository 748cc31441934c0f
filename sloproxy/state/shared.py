"""Scheduler state for one replica of several: a local ledger, fleet-wide counters through Redis.

What a replica holds (its reservations) is its own to count: the ledger stays local and its counts
are what the scheduler compares with the replica's share of each budget. What policies read about
the fleet — queue depths per model and class, tenants' served tokens, each backend's budget — goes
through the :class:`~.redis_state.RedisCoordinator`, whose numbers are at most one sync old.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .local import LocalState

if TYPE_CHECKING:
    from .redis_state import RedisCoordinator


class SharedState(LocalState):
    def __init__(self, coordinator: RedisCoordinator) -> None:
        super().__init__()
        self.coordinator = coordinator

    def set_budget(self, backend: str, budget: int) -> None:
        super().set_budget(backend, budget)
        self.coordinator.set_budget(backend, budget)

    def add_tenant_tokens(self, tenant: str, tokens: int) -> int:
        super().add_tenant_tokens(tenant, tokens)
        return self.coordinator.add_tenant_tokens(tenant, tokens)

    def tenant_tokens(self, tenant: str) -> int:
        return self.coordinator.tenant_tokens(tenant)

    def queue_changed(self, model: str, slo_class: str, delta: int) -> None:
        super().queue_changed(model, slo_class, delta)
        self.coordinator.queue_changed(model, slo_class, delta)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        return self.coordinator.queue_depths()
