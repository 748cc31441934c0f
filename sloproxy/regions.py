"""Tiers, pools and regions (SageServe, arXiv 2502.14617), from outside the engines.

Backends carry a ``region`` (and a free ``pool`` tag). Interactive work goes to the first region of
its preference list that hosts its model and whose KV utilisation is under
``interactive_kv_threshold``, else to the least utilised region hosting it; inside the region the
configured policy chooses as usual. Work of the *held* classes (default: the sheddable ones) waits in
a hold-back queue per (model, region) before it reaches the scheduler's queue, and is released a few
at a time on each completion (and on each metrics reading and timer tick) while that region's
utilisation stays at or under ``release_kv_threshold``. It keeps the scheduler's queue timeout and
deadline semantics: the scheduler's timer expires it with the same errors, and it counts against
the scheduler's ``max_queue`` (and ``max_queue_bytes``) as queued work does.

With every backend in one region the router is not built at all (``RegionRouter.active`` false):
the scheduler's hot path pays one ``is None`` check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated

import msgspec

from .errors import ProxyError

if TYPE_CHECKING:
    from .backends import Backend
    from .request import ProxyRequest
    from .slo import SLOClass, TenantConfig

    Held = tuple[ProxyRequest, asyncio.Future[bool]]  # a held request and its waiter (True: released)

REGION_HEADER = "x-sloproxy-region"
DEFAULT_REGION = "default"
MAX_HEADER_REGIONS = 16


class RegionsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The `regions:` block. Regions not in ``preference`` come after it, in the order backends name them."""

    preference: list[str] = msgspec.field(default_factory=list)  # the fleet's default region order
    interactive_kv_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.7  # the paper's value
    release_kv_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.6  # held work released at or under it
    release_per_completion: Annotated[int, msgspec.Meta(ge=1)] = 2  # held requests released per event
    held_classes: list[str] | None = None  # SLO classes held back; None: the sheddable classes


def utilisation(backends: Iterable[Backend]) -> float:
    """Mean KV utilisation of routable ``backends`` (0..1; 1.0 when none is routable).

    Per backend: the engine's measured ``kv_cache_usage_perc`` (fresh readings only), raised to the
    proxy's own reservation (prompt + predicted reply of its requests in flight over the engine's KV
    capacity) when that is higher, since readings lag dispatch by a polling interval. Without any
    KV figure, in flight over budget stands in."""
    total = 0.0
    count = 0
    for b in backends:
        if not b.healthy:
            continue
        load = b.load
        value: float | None = None
        if load is not None and not b.load_is_stale:
            value = load.kv_usage
            if load.kv_capacity_tokens:
                reserved = b.kv_reserved_tokens / load.kv_capacity_tokens
                value = reserved if value is None else max(value, reserved)
        if value is None:
            value = b.in_flight / max(b.budget, 1)
        total += min(value, 1.0)
        count += 1
    return total / count if count else 1.0


class RegionRouter:
    """Region choice and the hold-back queues. Built by the proxy when backends span several regions."""

    def __init__(self, config: RegionsConfig, backends: Sequence[Backend], classes: Iterable[SLOClass]) -> None:
        self.config = config
        order = list(dict.fromkeys([*config.preference, *(b.config.region for b in backends)]))
        self.regions: tuple[str, ...] = tuple(order)
        self.known = frozenset(order)
        self.by_model: dict[str, dict[str, list[Backend]]] = {}
        for b in backends:
            for model in b.models:
                self.by_model.setdefault(model, {}).setdefault(b.config.region, []).append(b)
        if config.held_classes is None:
            self.held_classes = frozenset(c.name for c in classes if c.sheddable)
        else:
            self.held_classes = frozenset(config.held_classes)
        self.held: dict[tuple[str, str], deque[Held]] = {}
        self.held_count = 0  # requests in every hold-back queue: the scheduler's max_queue counts them
        self.held_bytes = 0  # their bodies (max_queue_bytes)
        # (model, region, pool or "") -> requests dispatched there; pools come from the config (bounded)
        self.chosen: Counter[tuple[str, str, str]] = Counter()

    @property
    def active(self) -> bool:
        return len(self.regions) > 1

    # ----- preferences ----------------------------------------------------------------------------
    def preference(self, tenant: TenantConfig | None, headers: Mapping[str, str]) -> tuple[str, ...]:
        """The request's region order: the header, else the tenant's list, else the fleet's; the
        remaining regions follow (so a model hosted elsewhere is still served)."""
        value = headers.get(REGION_HEADER)
        if value is not None:
            first = self.parse_header(value)
        elif tenant is not None and tenant.regions:
            first = tuple(tenant.regions)
        else:
            return self.regions
        return tuple(dict.fromkeys([*first, *self.regions]))

    def parse_header(self, value: str) -> tuple[str, ...]:
        names = [part.strip() for part in value.split(",")]
        if not value.strip() or any(not n for n in names) or len(names) > MAX_HEADER_REGIONS:
            raise ProxyError(
                400,
                f"The `{REGION_HEADER}` header must be a comma-separated list of 1 to {MAX_HEADER_REGIONS} regions.",
                param=REGION_HEADER,
            )
        unknown = [n for n in names if n not in self.known]
        if unknown:
            raise ProxyError(
                400,
                f"The `{REGION_HEADER}` header names unknown region `{unknown[0][:64]}` "
                f"(known: {', '.join(self.regions)}).",
                param=REGION_HEADER,
            )
        return tuple(dict.fromkeys(names))

    # ----- choice ---------------------------------------------------------------------------------
    def routable(self, model: str, region: str, excluded: set[str] | frozenset[str] = frozenset()) -> list[Backend]:
        return [b for b in self.by_model.get(model, {}).get(region, ()) if b.healthy and b.name not in excluded]

    def utilisation(self, model: str, region: str) -> float:
        return utilisation(self.by_model.get(model, {}).get(region, ()))

    def choose(
        self, model: str, preference: Sequence[str], excluded: set[str] | frozenset[str] = frozenset()
    ) -> str | None:
        """The first region in ``preference`` with routable backends of ``model`` under the
        interactive threshold, else the least utilised region with any; None if there is none."""
        chosen = self._choose(model, preference, excluded)
        return chosen[0] if chosen is not None else None

    def _choose(
        self, model: str, preference: Sequence[str], excluded: set[str] | frozenset[str]
    ) -> tuple[str, list[Backend]] | None:
        """:meth:`choose`, with the chosen region's routable backends."""
        threshold = self.config.interactive_kv_threshold
        least: tuple[float, str, list[Backend]] | None = None
        for region in preference:
            backends = self.routable(model, region, excluded)
            if not backends:
                continue
            used = utilisation(backends)
            if used < threshold:
                return region, backends
            if least is None or used < least[0]:
                least = (used, region, backends)
        return (least[1], least[2]) if least is not None else None

    def serving(self, request: ProxyRequest, serving: Sequence[Backend]) -> list[Backend]:
        """The routable backends (healthy, not excluded) ``request`` may go to now: those of its pinned
        region (held work), else of the region chosen for it. The one region decision per scheduling
        decision: callers filter no further by region. Falls back to the routable ones of ``serving``
        when no region can take it."""
        region = request.region
        if region is not None:
            backends = self.routable(request.model, region, request.excluded)
            if backends:
                return backends
        chosen = self._choose(request.model, request.regions or self.regions, request.excluded)
        if chosen is None:
            return [b for b in serving if b.healthy and b.name not in request.excluded]
        return chosen[1]

    # ----- hold-back ------------------------------------------------------------------------------
    def holds(self, request: ProxyRequest) -> bool:
        return request.slo is not None and request.slo.name in self.held_classes

    def pin(self, request: ProxyRequest) -> bool:
        """Pin ``request`` to a region (the interactive choice for it); True if it must wait in that
        region's hold-back queue (others of its (model, region) wait, or the region is over the
        release threshold). Nothing routable: not pinned, not held (the scheduler answers it)."""
        region = self.choose(request.model, request.regions or self.regions, request.excluded)
        if region is None:
            return False
        request.region = region
        key = (request.model, region)
        return bool(self.held.get(key)) or self.utilisation(*key) > self.config.release_kv_threshold

    async def wait(self, request: ProxyRequest) -> bool:
        """Wait in the hold-back queue of ``request``'s pinned region. True once released; False when
        this router was replaced (a reload): the caller holds it again with the new router."""
        key = (request.model, request.region or "")
        queue = self.held.get(key)
        if queue is None:
            queue = self.held[key] = deque()
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (request, waiter)
        queue.append(entry)
        self._count(request, 1)
        try:
            return await waiter
        finally:
            if not waiter.done() or waiter.cancelled():  # still queued: its client left, or the proxy stops
                with contextlib.suppress(ValueError):
                    queue.remove(entry)
                    self._count(request, -1)

    def _count(self, request: ProxyRequest, sign: int) -> None:
        self.held_count += sign
        self.held_bytes += sign * len(request.raw)

    def _take(self, queue: deque[Held]) -> Held:
        entry = queue.popleft()
        self._count(entry[0], -1)
        return entry

    def release(self, model: str, region: str, limit: int | None = None) -> int:
        """Release up to ``limit`` (default ``release_per_completion``) held requests of (model,
        region) while its utilisation stays at or under the release threshold."""
        queue = self.held.get((model, region))
        if not queue:
            return 0
        limit = self.config.release_per_completion if limit is None else limit
        released = 0
        while queue and released < limit and self.utilisation(model, region) <= self.config.release_kv_threshold:
            _, waiter = self._take(queue)
            if not waiter.done():
                waiter.set_result(True)
                released += 1
        return released

    def completed(self, backend: Backend) -> None:
        """Event: a request finished on ``backend``, or its metrics were read: release held work."""
        region = backend.config.region
        for model in backend.models:
            self.release(model, region)

    def release_all(self) -> None:
        """Timer: release a few per (model, region) where utilisation allows."""
        for model, region in list(self.held):
            self.release(model, region)

    def waiting(self) -> Iterable[tuple[tuple[str, str], ProxyRequest, asyncio.Future[bool]]]:
        for key, queue in self.held.items():
            for request, waiter in queue:
                yield key, request, waiter

    def fail(self, request: ProxyRequest, error: ProxyError) -> None:
        """Take ``request`` out of its hold-back queue; its waiter gets ``error``."""
        queue = self.held.get((request.model, request.region or ""))
        if not queue:
            return
        for entry in queue:
            if entry[0] is request:
                queue.remove(entry)
                self._count(request, -1)
                if not entry[1].done():
                    entry[1].set_exception(error)
                return

    def hand_back(self) -> list[ProxyRequest]:
        """This router is being replaced (a reload): every held request leaves its queue and its
        waiter gets False, so its ``acquire`` holds it again with the new router. Returns them."""
        requests = []
        for queue in self.held.values():
            while queue:
                request, waiter = self._take(queue)
                if not waiter.done():
                    waiter.set_result(False)
                    requests.append(request)
        return requests

    def order(self, preference: Sequence[str] | None) -> tuple[str, ...]:
        """``preference`` (from another router) for this one: its regions that still exist, then the rest."""
        return tuple(r for r in dict.fromkeys([*(preference or ()), *self.regions]) if r in self.known)

    def dispatched(self) -> list[tuple[tuple[str, str, str], int]]:
        """Requests dispatched per (model, region, pool): every combination the backends have now (0
        until used), and any counted under tags a reload has since changed (counters never vanish)."""
        keys = set(self.chosen)
        for model, by_region in self.by_model.items():
            for region, backends in by_region.items():
                keys.update((model, region, b.config.pool or "") for b in backends)
        return [(key, self.chosen[key]) for key in sorted(keys)]

    def depths(self) -> dict[tuple[str, str], int]:
        return {key: len(queue) for key, queue in self.held.items()}

    def fail_all(self, error: ProxyError) -> None:
        for queue in self.held.values():
            while queue:
                _, waiter = self._take(queue)
                if not waiter.done():
                    waiter.set_exception(error)
