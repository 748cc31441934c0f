"""Admission and routing parts shared by the built-in policies."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Admission, BackendState, Evict, FleetPolicy, Scorer, Snapshot

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
            return backend.urgent_budget
        return max(1, int(backend.budget * (1.0 - self.reserve)))

    def admit(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool:
        if backend.in_flight >= self.limit(request, backend):
            return False
        return self._kv_ok(backend)

    def _kv_ok(self, backend: BackendState) -> bool:
        load = backend.load
        return load is None or load.kv_usage is None or load.kv_usage < self.kv_limit or backend.load_is_stale

    def admitted(
        self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot
    ) -> list[BackendState]:
        # Inlined twins of admit(): this runs over every backend for every dispatch decision.
        cap = self.kv_limit
        if request.band == 0:
            return [
                b
                for b in backends
                if b.in_flight < b.urgent_budget
                and ((load := b.load) is None or load.kv_usage is None or load.kv_usage < cap or b.load_is_stale)
            ]
        keep = 1.0 - self.reserve
        return [
            b
            for b in backends
            if b.in_flight < max(1, int(b.budget * keep))
            and ((load := b.load) is None or load.kv_usage is None or load.kv_usage < cap or b.load_is_stale)
        ]


class LeastLoad(Scorer):
    """Fewer requests on the backend is better: the proxy's own in-flight count (always current)
    plus the engine's waiting queue and KV pressure while its reading is fresh.

    ``relative``: each score divided by the best candidate's, so the least-loaded backend scores 1
    at any load. The absolute score ``1 / (1 + load)`` flattens as load grows (20 vs 30 in flight:
    0.048 vs 0.032), so a second scorer of fixed weight (a 0.1 length affinity) that only breaks
    near-ties at 3-5 requests per engine decides the route outright at 20-50; relative, a
    weight-w scorer outweighs a load gap of at most about w at every load.
    """

    def __init__(self, relative: bool = False) -> None:
        self.relative = relative

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        load = backend.load
        queued = float(backend.in_flight)
        kv = 0.0
        if load is not None and not backend.load_is_stale:
            queued += load.waiting
            kv = load.kv_usage or 0.0
        return (1.0 - 0.5 * kv) / (1.0 + queued)

    def scores(self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot) -> list[float]:
        scores = [
            (1.0 - 0.5 * (load.kv_usage or 0.0)) / (1.0 + b.in_flight + load.waiting)
            if (load := b.load) is not None and not b.load_is_stale
            else 1.0 / (1.0 + b.in_flight)
            for b in backends
        ]
        if self.relative and scores:
            best = max(scores)
            if best > 0:
                scores = [s / best for s in scores]
        return scores


class EvictForUrgent(FleetPolicy):
    """When urgent (band 0) work is about to miss its first deadline and every backend serving
    its model is at budget, evict enough lower-band requests that have sent nothing to their
    clients yet (youngest first: the least work lost) to open one slot on the backend where
    that takes the fewest evictions. Evicted work goes back to the queue transparently."""

    def __init__(self, margin_s: float = 0.5) -> None:
        self.margin_s = margin_s

    def actions(
        self, snapshot: Snapshot, waiting: Sequence[ProxyRequest], running: Sequence[ProxyRequest]
    ) -> list[Evict]:
        horizon = snapshot.now + self.margin_s
        urgent = [r for r in waiting if r.band == 0 and r.urgent_deadline is not None and r.urgent_deadline < horizon]
        if not urgent:
            return []
        evictions: list[Evict] = []
        freed: dict[str, int] = {}  # backend -> slots this round already opens
        taken: set[str] = set()
        for request in sorted(urgent, key=lambda r: r.urgent_deadline):
            options = []
            for backend in snapshot.backends:
                if not backend.healthy or request.model not in backend.models:
                    continue
                need = backend.in_flight - freed.get(backend.name, 0) - backend.urgent_budget + 1
                if need <= 0:
                    options = []
                    break  # it will be dispatched without anyone leaving
                if backend.priority_scheduling:
                    continue  # an engine that schedules by priority preempts for it: no abort needed
                victims = sorted(
                    (
                        v
                        for v in running
                        if v.backend == backend.name and v.band > 0 and not v.first_byte_sent and v.id not in taken
                    ),
                    key=lambda v: v.seq,
                    reverse=True,
                )
                if len(victims) >= need:
                    options.append((need, backend.name, victims[:need]))
            if not options:
                continue
            need, name, victims = min(options, key=lambda option: option[0])
            for victim in victims:
                taken.add(victim.id)
                evictions.append(Evict(victim.id, f"urgent request {request.id} would miss its deadline"))
            freed[name] = freed.get(name, 0) + need
        return evictions


class PrefixAffinity(Scorer):
    """Send a request to the backend that recently served the longest prefix of its prompt, so the
    engine's prefix cache hits; bounded by load so one hot prefix cannot pile onto one backend.

    Prefixes are the chained hashes of the prompt's leading blocks (``ProxyRequest.prefix_hashes``).
    The score is the matched share of those blocks on the owning backend, 0 elsewhere, and 0 on
    the owner too when it carries more than ``max_load_ratio`` x the least-loaded candidate's
    in-flight requests (+2).
    """

    def __init__(self, max_load_ratio: float = 1.5, capacity: int = 200_000) -> None:
        self.max_load_ratio = max_load_ratio
        self.capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()

    def _match(self, request: ProxyRequest) -> tuple[str | None, float]:
        keys = request.prefix_hashes
        for depth in range(len(keys), 0, -1):
            owner = self._owner.get(keys[depth - 1])
            if owner is not None:
                return owner, depth / len(keys)
        return None, 0.0

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        return self.scores(request, [backend], snapshot)[0]

    def scores(self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot) -> list[float]:
        owner, share = self._match(request)
        if owner is None:
            return [0.0] * len(backends)
        bound = self.max_load_ratio * min(b.in_flight for b in backends) + 2
        return [share if b.name == owner and b.in_flight <= bound else 0.0 for b in backends]

    def chosen(self, request: ProxyRequest, backend: BackendState) -> None:
        owners = self._owner
        for key in request.prefix_hashes:
            owners[key] = backend.name
            owners.move_to_end(key)
        while len(owners) > self.capacity:
            owners.popitem(last=False)
