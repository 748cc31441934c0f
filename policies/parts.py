"""Admission and routing parts shared by the built-in policies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Admission, BackendState, Scorer, Snapshot

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class BudgetAdmission(Admission):
    """A backend takes work while the proxy has fewer than its budget in flight on it and its
    KV cache (when freshly reported) has headroom."""

    def __init__(self, kv_limit: float = 0.95) -> None:
        self.kv_limit = kv_limit

    def admit(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool:
        if backend.in_flight >= backend.budget:
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


def least_loaded(backends: Sequence[BackendState]) -> BackendState:
    return min(backends, key=lambda b: b.in_flight)
