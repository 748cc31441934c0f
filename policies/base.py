"""The policy plugin API: small typed parts composed into named policies.

A policy decides; it never does I/O and never awaits. The proxy (and the trace-driven
simulator) hand it the state it needs and act on what it returns, so the same policy object
runs live and in simulation, and unit tests need no servers.

Parts, each with one job (in the spirit of llm-d's Filter / Scorer / Picker):

* :class:`Ordering` — the waiting queue's discipline: which waiting request goes next.
* :class:`Admission` — may backend B take request R now (budgets, KV headroom)?
* :class:`Filter` and :class:`Scorer` — routing: drop unsuitable backends, score the rest;
  the policy weights scores and picks the best.
* :class:`FleetPolicy` — the slow path: actions on the fleet (evictions, model swaps).

A :class:`Policy` is a named preset of parts. Plugins register a :class:`PolicySpec` (its
parameter type, validated strictly, and a builder) in the ``sloproxy.policies`` entry-point
group; see ``docs/policies.md``.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class LoadView(Protocol):
    """Engine-reported load (from /metrics); any field may be None where the engine does not say."""

    running: int
    waiting: int
    kv_usage: float | None


class BackendState(Protocol):
    """What a policy may read about a backend (the live proxy and the simulator both provide it)."""

    name: str
    models: frozenset[str]
    healthy: bool
    in_flight: int  # dispatched by the proxy and not finished
    budget: int  # admission budget: how many in flight the proxy allows (adapts to engine metrics)
    priority_scheduling: bool  # the engine runs by priority itself
    urgent_budget: int  # the budget for band-0 work: above ``budget`` where the engine preempts by priority
    kv_reserved_tokens: int  # prompt + predicted p90 reply tokens of the proxy's in-flight requests on it
    kv_urgent_tokens: int  # the part of it band-0 requests hold (this replica's)

    @property
    def load(self) -> LoadView | None: ...

    @property
    def load_is_stale(self) -> bool: ...


@dataclass(slots=True)
class Snapshot:
    """The world a decision sees: the time (monotonic seconds) and the fleet. Read-only by contract;
    not a frozen dataclass, whose ``__init__`` sets each field through ``object.__setattr__``: about
    a microsecond more, paid on every dispatch decision (a twentieth of one at 10,000 waiting)."""

    now: float
    backends: Sequence[BackendState]


class Ordering(ABC):
    """A waiting queue for one model. Implementations keep operations O(log n) or better."""

    # Orderings that look at the time read it here; the scheduler sets its own clock (virtual in the
    # simulator) on every queue it creates.
    clock: Callable[[], float] = staticmethod(time.monotonic)
    # True where the head, removed right after a peek and pushed back, is the head again and is queued
    # once (no marked twin left behind): the scheduler then sets aside a head confined to backends that
    # are full to reach the work behind it (Scheduler._park). False: the head of line waits.
    restores_removed_head: bool = False

    @abstractmethod
    def push(self, request: ProxyRequest) -> None: ...

    @abstractmethod
    def peek(self) -> ProxyRequest | None:
        """The request that would go next (None when empty)."""

    @abstractmethod
    def pop(self) -> ProxyRequest:
        """Remove and return :meth:`peek`'s request."""

    @abstractmethod
    def remove(self, request: ProxyRequest) -> bool:
        """Take out a request that will not be dispatched (timed out, shed, client gone)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[ProxyRequest]:
        """Every waiting request, in no particular order (for timers and snapshots)."""

    def on_time_ahead(self, request: ProxyRequest) -> int | None:
        """How many waiting requests would go before ``request`` if it joined now and can still meet
        their deadlines (None: this ordering does not say)."""
        return None

    def served(self, request: ProxyRequest, tokens: int) -> None:  # noqa: B027 - optional hook
        """A dispatched request finished having used ``tokens`` (fair-share accounting)."""


class Admission(ABC):
    @abstractmethod
    def admit(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool: ...

    def admitted(
        self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot
    ) -> list[BackendState]:
        """All of ``backends`` that :meth:`admit` the request (override for speed on large fleets)."""
        return [b for b in backends if self.admit(request, b, snapshot)]


class Filter(ABC):
    @abstractmethod
    def filter(
        self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot
    ) -> Sequence[BackendState]: ...


class Scorer(ABC):
    @abstractmethod
    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        """Higher is better, in [0, 1]."""

    def scores(self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot) -> list[float]:
        """:meth:`score` for each backend (override for speed on large fleets)."""
        return [self.score(request, b, snapshot) for b in backends]

    def chosen(self, request: ProxyRequest, backend: BackendState) -> None:  # noqa: B027 - optional hook
        """The policy routed ``request`` to ``backend`` (scorers that learn from routing)."""


@dataclass(frozen=True, slots=True)
class Evict:
    """Abort ``request_id`` on its backend and requeue it (it has sent nothing to its client yet)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Swap:
    """Wake the sleeping backend ``backend`` (it serves ``model``), putting ``victim`` of its GPU group
    to sleep if the group is full (None: the swapper picks one by its own rule). Carried out by the
    proxy's swapper (sloproxy/swapping.py), which drains the victim first and may decline."""

    model: str
    backend: str
    victim: str | None
    reason: str


FleetAction = Evict | Swap


class FleetPolicy(ABC):
    @abstractmethod
    def actions(
        self, snapshot: Snapshot, waiting: Sequence[ProxyRequest], running: Sequence[ProxyRequest]
    ) -> list[FleetAction]: ...


class Refusal(Protocol):
    """Refuses queued interactive work past capacity, fed by outcomes (``policies/overload.py``)."""

    def refuses(self, request: ProxyRequest) -> bool: ...

    def outcome(self, model: str, met: bool) -> None: ...


@dataclass(eq=False)
class Policy:
    """A named composition of parts. ``queued=False`` means no proxy queue: dispatch at once."""

    name: str
    ordering: Callable[[], Ordering]
    admission: Admission | None = None
    filters: list[Filter] = field(default_factory=list)
    scorers: list[tuple[Scorer, float]] = field(default_factory=list)
    fleet: FleetPolicy | None = None
    # Refuses queued interactive work while its model misses its targets (``policies/overload.py``):
    # ``refuses(request)`` as the work is about to queue; ``outcome(model, met)`` at each interactive
    # first token (on time or late) or overrun refusal, and as sheddable work is dispatched or shed.
    refusal: Refusal | None = None
    queued: bool = True
    uses_predictions: bool = False  # reads predicted reply lengths: the proxy runs the predictor for it
    _turn: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def route(
        self, request: ProxyRequest, candidates: Sequence[BackendState], snapshot: Snapshot
    ) -> BackendState | None:
        """Filter, then the best weighted score; ties go round-robin so equal backends share load."""
        for part in self.filters:
            candidates = part.filter(request, candidates, snapshot)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        turn = next(self._turn)
        if not self.scorers:
            return candidates[turn % len(candidates)]
        scorer, weight = self.scorers[0]
        totals = scorer.scores(request, candidates, snapshot)
        if weight != 1.0 or len(self.scorers) > 1:
            totals = [weight * t for t in totals]
            for scorer, weight in self.scorers[1:]:
                totals = [
                    t + weight * s for t, s in zip(totals, scorer.scores(request, candidates, snapshot), strict=True)
                ]
        top = max(totals)
        if totals.count(top) == 1:
            chosen = candidates[totals.index(top)]
        else:
            best = [b for b, t in zip(candidates, totals, strict=True) if t == top]
            chosen = best[turn % len(best)]
        for scorer, _ in self.scorers:
            scorer.chosen(request, chosen)
        return chosen

    def admits(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> bool:
        return self.admission is None or self.admission.admit(request, backend, snapshot)

    def admitting(
        self, request: ProxyRequest, backends: Sequence[BackendState], snapshot: Snapshot
    ) -> Sequence[BackendState]:
        """The backends that may take ``request`` now."""
        return backends if self.admission is None else self.admission.admitted(request, backends, snapshot)


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """For policies without parameters: any field given is an error."""


@dataclass(frozen=True)
class PolicySpec:
    """What a plugin registers: a parameter type (validated strictly) and a builder."""

    name: str
    params: type[msgspec.Struct]
    build: Callable[[Any], Policy]
    summary: str = ""

    def create(self, raw_params: dict[str, Any] | None) -> Policy:
        try:
            params = msgspec.convert(raw_params or {}, self.params)
        except msgspec.ValidationError as exc:
            raise ValueError(f"policy {self.name!r}: {exc}") from None
        return self.build(params)
