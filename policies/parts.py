"""Admission and routing parts shared by the built-in policies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Admission, BackendState, Scorer, Snapshot

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class BudgetAdmission(Admission):
    """A backend takes work while the proxy has fewer than its budget in flight on it and its
    KV cache (when freshly reported) has headroom.

    Work outside the top band (band 0) may only fill ``1 - reserve`` of the budget: the rest is
    kept for urgent requests, so a flood of batch work cannot make interactive work wait for a
    batch request to finish.
    """

    def __init__(self, kv_limit: float = 0.95, reserve: float = 0.25) -> None:
        self.kv_limit = kv_limit
        self.reserve = reserve

    def limit(self, request: ProxyRequest, backend: BackendState) -> int:
        if request.band == 0:
            return backend.budget
        return max(1, int(backend.budget * (1.0 - self.reserve)))

    def admit(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool:
        if backend.in_flight >= self.limit(request, backend):
            return False
        load = backend.load
        return load is None or backend.load_is_stale or load.kv_usage is None or load.kv_usage < self.kv_limit


class LeastLoad(Scorer):
    """Fewer requests on the backend is better: the proxy's own in-flight count (always current)
    plus the engine's waiting queue and KV pressure while its reading is fresh."""

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        load = backend.load
        queued = float(backend.in_flight)
        kv = 0.0
        if load is not None and not backend.load_is_stale:
            queued += load.waiting
            kv = load.kv_usage or 0.0
        return (1.0 - 0.5 * kv) / (1.0 + queued)
