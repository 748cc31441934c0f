"""EcoServe's ideas as far as a proxy reaches: reserve KV for each request's predicted reply up front
(no preemption storms), keep similar predicted reply lengths together, serve big KV footprints first.

EcoServe (arXiv 2411.06364) reserves KV for the predicted response length inside the engine and
batches generation tasks of similar predicted length. From outside, the proxy admits a request to an
instance only while the prompt + predicted p90 reply tokens of everything it has in flight there fit
the instance's KV capacity (``kv_capacity_tokens`` from the engine's metrics: vLLM's cache_config_info
blocks x block size, TGI's token budget, SGLang's max total tokens), cross-checked against the
reported KV usage; routes requests of one length bucket to the instances already serving that
bucket; and orders the queue by KV footprint with deadlines as the tie-break.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from sloproxy.request import kv_footprint

from .base import Admission, BackendState, Ordering, Policy, PolicySpec, Scorer, Snapshot
from .orderings import HeapOrdering
from .parts import BudgetAdmission, EvictForUrgent, LeastLoad
from .presets import QueuedParams

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class KVReserveAdmission(Admission):
    """The budget admission, plus: the backend's reserved KV (in-flight prompt + p90 reply tokens) and
    this request's must fit ``headroom`` x its KV capacity. A backend with nothing of ours in flight
    always admits (a request larger than the cache must still go somewhere; the engine decides), and
    one whose capacity was never reported is judged by the budget alone."""

    def __init__(
        self,
        kv_limit: float = 0.95,
        reserve: float = 0.25,
        headroom: float = 1.0,
        urgent_margin: float = 1.25,
        urgent_half_life_s: float = 30.0,
    ) -> None:
        self.budget = BudgetAdmission(kv_limit, reserve)
        self.headroom = headroom
        self.capacity: dict[str, int] = {}  # last capacity each backend reported (it rarely changes)
        self.urgent_margin = urgent_margin
        self.urgent_half_life_s = urgent_half_life_s
        self._urgent_peak: dict[str, tuple[float, float]] = {}  # backend -> (decaying peak of band-0 KV, when)

    def kv_capacity(self, backend: BackendState) -> int | None:
        load = backend.load
        if load is not None and load.kv_capacity_tokens:
            self.capacity[backend.name] = load.kv_capacity_tokens
        return self.capacity.get(backend.name)

    def urgent_peak(self, backend: BackendState, now: float) -> float:
        """Band-0 KV reserved on ``backend``: its recent peak, halving every ``urgent_half_life_s``."""
        urgent = backend.kv_urgent_tokens
        peak, at = self._urgent_peak.get(backend.name, (0.0, now))
        if now > at:
            peak *= 0.5 ** ((now - at) / self.urgent_half_life_s)
        if urgent >= peak or now > at:
            peak = max(peak, float(urgent))
            self._urgent_peak[backend.name] = (peak, now)
        return peak

    def fits(self, request: ProxyRequest, backend: BackendState, now: float) -> bool:
        """Band-0 work may fill the whole headroom. Other work may use only what band 0 is not
        holding and has not recently needed: ``max(reserve x headroom, urgent_margin x its decaying
        peak)`` stays free for band 0. On a KV-bound engine the KV check binds before the budget,
        and batch replies in flight cannot be moved: a fixed quarter kept for interactive work was
        not enough when interactive demand was higher (5x overload, measured: interactive TTFT
        misses while batch held a quarter of the KV), so the reserve follows band 0's own demand."""
        capacity = self.kv_capacity(backend)
        peak = self.urgent_peak(backend, now)
        if capacity is None or backend.in_flight == 0:
            return True
        limit = self.headroom * capacity
        footprint = kv_footprint(request)
        if request.band == 0:
            return backend.kv_reserved_tokens + footprint <= limit
        limit = min(self.headroom, 1.0) * capacity  # no overcommit for work that cannot be moved later
        urgent = backend.kv_urgent_tokens
        held_for_urgent = max(urgent, self.budget.reserve * limit, self.urgent_margin * peak)
        return backend.kv_reserved_tokens - urgent + footprint + held_for_urgent <= limit

    def admit(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool:
        return self.budget.admit(request, backend, snapshot) and self.fits(request, backend, snapshot.now)

    def admitted(
        self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot
    ) -> list[BackendState]:
        """:meth:`admit` over ``backends``: :meth:`fits`, :meth:`kv_capacity` and :meth:`urgent_peak`
        inlined (this runs over every backend with room for every dispatch decision), with what depends
        on the request alone (its footprint, its band's limits) computed once rather than per backend.
        ``tests/test_paper_policies.py`` holds it to the same decisions and records as :meth:`admit`."""
        now = snapshot.now
        admitted = []
        footprint: int | None = None
        urgent_work = request.band == 0
        headroom, reserve, margin = self.headroom, self.budget.reserve, self.urgent_margin
        capacities, peaks, half_life = self.capacity, self._urgent_peak, self.urgent_half_life_s
        for b in self.budget.admitted(request, backends, snapshot):
            name = b.name
            load = b.load
            if load is not None and load.kv_capacity_tokens:
                capacities[name] = load.kv_capacity_tokens
            capacity = capacities.get(name)
            # urgent_peak(b, now): its decaying record is kept current whether or not it is read here
            urgent = b.kv_urgent_tokens
            peak, at = peaks.get(name, (0.0, now))
            if now > at:
                peak *= 0.5 ** ((now - at) / half_life)
            if urgent >= peak or now > at:
                if urgent > peak:  # max(peak, float(urgent))
                    peak = float(urgent)
                peaks[name] = (peak, now)
            if capacity is None or b.in_flight == 0:
                admitted.append(b)
                continue
            if footprint is None:
                footprint = kv_footprint(request)
            if urgent_work:
                if b.kv_reserved_tokens + footprint <= headroom * capacity:
                    admitted.append(b)
                continue
            limit = min(headroom, 1.0) * capacity
            urgent = b.kv_urgent_tokens
            held_for_urgent = max(urgent, reserve * limit, margin * peak)
            if b.kv_reserved_tokens - urgent + footprint + held_for_urgent <= limit:
                admitted.append(b)
        return admitted


def length_bucket(request: ProxyRequest, edges: Sequence[int] = (64, 256, 1024)) -> int:
    """The predicted-reply-length bucket (p50): short, medium, long, very long by default."""
    tokens = request.pred_p50 if request.pred_p50 is not None else request.est_output_tokens
    for index, edge in enumerate(edges):
        if tokens < edge:
            return index
    return len(edges)


class LengthAffinity(Scorer):
    """Prefer the backend whose recently routed requests share this request's length bucket, so
    replies of similar length decode side by side and free their KV together (EcoServe's grouping of
    generation tasks by predicted length). Score: the share of the last ``window`` requests routed to
    the backend that were in the same bucket (0 for a backend with no history)."""

    def __init__(self, edges: Sequence[int] = (64, 256, 1024), window: int = 8) -> None:
        self.edges = tuple(edges)
        self.window = window
        self._recent: dict[str, deque[int]] = {}

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        recent = self._recent.get(backend.name)
        if not recent:
            return 0.0
        bucket = length_bucket(request, self.edges)
        return sum(1 for b in recent if b == bucket) / len(recent)

    def scores(self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot) -> list[float]:
        """:meth:`score` for each backend, the request's bucket computed once."""
        bucket = length_bucket(request, self.edges)
        history = self._recent
        scores = []
        for backend in backends:
            recent = history.get(backend.name)
            scores.append(recent.count(bucket) / len(recent) if recent else 0.0)
        return scores

    def chosen(self, request: ProxyRequest, backend: BackendState) -> None:
        recent = self._recent.setdefault(backend.name, deque(maxlen=self.window))
        recent.append(length_bucket(request, self.edges))


def footprint_first(slot_tokens: int = 1024) -> HeapOrdering:
    """Band first; then the larger KV footprint (prompt + p90 reply, in ``slot_tokens`` slots, so that
    near-equal sizes tie); then the earlier deadline. Big requests started first release their KV
    (and their long decode) soonest; the deadline keeps equal sizes in urgency order."""

    def key(request: ProxyRequest) -> tuple:
        deadline = request.urgent_deadline if request.urgent_deadline is not None else math.inf
        return (request.band, -(kv_footprint(request) // slot_tokens), deadline)

    return HeapOrdering(key)


class KVReserveParams(QueuedParams, forbid_unknown_fields=True):
    """What the KV-reserving policies (ecoserve, slo) share."""

    kv_headroom: float = 1.0  # share of each backend's KV capacity the reservations may fill
    urgent_kv_margin: float = 1.25  # KV kept for band 0: this x its recent peak (at least `reserve`)
    urgent_kv_half_life_s: float = 30.0  # how fast that peak is forgotten
    least_load_relative: bool = False  # least-load scores relative to the best candidate (parts.LeastLoad)


class EcoServeParams(KVReserveParams, forbid_unknown_fields=True):
    length_edges: list[int] = msgspec.field(default_factory=lambda: [64, 256, 1024])  # bucket edges, tokens
    length_affinity_weight: float = 0.3
    slot_tokens: int = 1024  # footprint granularity of the ordering


def kv_reserving(name: str, ordering: Callable[[], Ordering], params: Any) -> Policy:
    """KV-reservation admission, least-load routing with length affinity, eviction for urgent work:
    the parts ecoserve and slo share (``params`` has their common fields); only the order differs."""
    return Policy(
        name,
        ordering=ordering,
        admission=KVReserveAdmission(
            params.kv_limit, params.reserve, params.kv_headroom, params.urgent_kv_margin, params.urgent_kv_half_life_s
        ),
        scorers=[
            (LeastLoad(params.least_load_relative), params.least_load_weight),
            (LengthAffinity(params.length_edges), params.length_affinity_weight),
        ],
        fleet=EvictForUrgent(params.evict_margin_s) if params.evict else None,
        uses_predictions=True,
    )


def build(params: EcoServeParams) -> Policy:
    return kv_reserving("ecoserve", lambda: footprint_first(params.slot_tokens), params)


ECOSERVE = PolicySpec(
    "ecoserve",
    EcoServeParams,
    build,
    "KV reserved for prompt + predicted p90 reply per instance; length-bucket affinity; big footprints first.",
)
