"""Queue disciplines: FIFO, earliest deadline first, strict bands with fair shares per tenant.

All are heaps or deques with lazy deletion, so push, pop and remove stay O(log n).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .base import Ordering

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class HeapOrdering(Ordering):
    """A min-heap on ``key(request)``, ties in arrival order; removal marks the entry and pops skip it.

    ``key`` returns a number or a tuple. Each heap entry is ``(key, seq, request)``, so a tuple key
    costs a nested tuple comparison at every sift step; with 10,000 waiting a pop's ~14 steps of them
    were most of EDF's share of a dispatch decision. An ordering by one number returns the number."""

    restores_removed_head = True

    def __init__(self, key: Callable[[ProxyRequest], Any]) -> None:
        self._key = key
        self._heap: list[tuple[Any, int, ProxyRequest]] = []
        self._live: set[int] = set()  # id() of queued requests

    def push(self, request: ProxyRequest) -> None:
        heapq.heappush(self._heap, (self._key(request), request.seq, request))
        self._live.add(id(request))

    def _skip_removed(self) -> None:
        heap = self._heap
        while heap and id(heap[0][2]) not in self._live:
            heapq.heappop(heap)

    def peek(self) -> ProxyRequest | None:
        self._skip_removed()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> ProxyRequest:
        self._skip_removed()
        request = heapq.heappop(self._heap)[2]
        self._live.discard(id(request))
        return request

    def remove(self, request: ProxyRequest) -> bool:
        """Take ``request`` out. The head's entry leaves the heap at once (the scheduler sets a head aside
        and pushes it back within one dispatch: a marked entry left behind would then count as the
        pushed one's twin); any other is marked and skipped later."""
        if id(request) not in self._live:
            return False
        self._live.discard(id(request))
        heap = self._heap
        if heap[0][2] is request:
            heapq.heappop(heap)
        elif len(heap) > 64 and len(self._heap) > 2 * len(self._live):  # keep dead entries bounded
            self._heap = [entry for entry in self._heap if id(entry[2]) in self._live]
            heapq.heapify(self._heap)
        return True

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ProxyRequest]:
        return (entry[2] for entry in self._heap if id(entry[2]) in self._live)


def fifo() -> Ordering:
    """First come, first served (ties cannot happen: arrival sequence numbers are unique)."""
    return HeapOrdering(lambda r: r.seq)


def _deadline_key(request: ProxyRequest) -> float:
    """The first deadline (infinite without one): ties go in arrival order (see :class:`HeapOrdering`)."""
    return request.urgent_deadline if request.urgent_deadline is not None else math.inf


class _DeadlineHeap(HeapOrdering):
    """A heap on the first deadline (:func:`_deadline_key`) that hands over the requests whose deadline
    has passed in one call: :class:`LateLastEDF` asks on every peek, and a peek-then-pop per request
    skipped removed entries twice and cost three calls."""

    def __init__(self) -> None:
        super().__init__(_deadline_key)

    def pop_overdue(self, now: float) -> list[ProxyRequest]:
        """Pop, in deadline order, the requests whose first deadline is before ``now``."""
        heap, live = self._heap, self._live
        overdue = []
        while heap:
            request = heap[0][2]
            if id(request) in live:
                deadline = request.urgent_deadline
                if deadline is None or not deadline < now:
                    break
                live.discard(id(request))
                overdue.append(request)
            heapq.heappop(heap)
        return overdue


class LateLastEDF(Ordering):
    """Earliest deadline first among requests that can still meet their first deadline. One whose
    deadline has passed waits while on-time work of its band or a more important band waits, then
    goes before less important bands' work; overdue work of a band leaves in deadline order.

    Plain EDF under overload serves the most overdue request first, so once the queue is late every
    request in it misses (the domino effect): in a burst above capacity, on-time work lined up behind
    requests already lost. Nothing is dropped here; overdue work is only served after on-time work.
    """

    restores_removed_head = True

    def __init__(self) -> None:
        self._on_time = _DeadlineHeap()
        # Band -> how many on-time requests of it wait; a band leaves when none do, and so does a band's
        # late queue when it empties: the next request is then found from the bands present (the
        # smallest key of each) rather than by asking every queue its length. A plain dict: a Counter's
        # missing key and deletion are Python-level methods, run on every request that falls overdue.
        self._on_time_bands: dict[int, int] = {}
        self._late: dict[int, HeapOrdering] = {}  # band -> its overdue requests (while there are any)
        self._late_count = 0  # how many overdue requests wait, over all bands
        # What peek() returned: pop() takes exactly that request. Time moves between the two calls
        # (the scheduler places the head first), and re-judging then could pop another request (an
        # on-time one, when the head fell overdue meanwhile), which left the queue undispatched.
        self._peeked: ProxyRequest | None = None

    def _demote_overdue(self) -> None:
        for head in self._on_time.pop_overdue(self.clock()):
            self._left_on_time(head.band)
            late = self._late.get(head.band)
            if late is None:
                late = self._late[head.band] = HeapOrdering(_deadline_key)
            late.push(head)
            self._late_count += 1

    def _next(self) -> HeapOrdering | None:
        self._demote_overdue()
        late, on_time_bands = self._late, self._on_time_bands
        if late:
            band = min(late)  # the most important band with overdue work
            if not on_time_bands or min(on_time_bands) > band:  # no on-time work of it or above waits
                return late[band]
        return self._on_time if on_time_bands else None

    def _left_on_time(self, band: int) -> None:
        """An on-time request of ``band`` left the on-time queue."""
        bands = self._on_time_bands
        bands[band] -= 1
        if not bands[band]:
            del bands[band]

    def _left_late(self, band: int) -> None:
        """An overdue request of ``band`` left its late queue."""
        self._late_count -= 1
        if not len(self._late[band]):
            del self._late[band]

    def push(self, request: ProxyRequest) -> None:
        self._on_time.push(request)
        bands = self._on_time_bands
        bands[request.band] = bands.get(request.band, 0) + 1

    def on_time_ahead(self, request: ProxyRequest) -> int:
        """The on-time requests of its band or a more important one (same-class arrivals before it have
        earlier deadlines; overdue ones go after it)."""
        self._demote_overdue()
        return sum(count for band, count in self._on_time_bands.items() if band <= request.band)

    def peek(self) -> ProxyRequest | None:
        queue = self._next()
        self._peeked = queue.peek() if queue is not None else None
        return self._peeked

    def pop(self) -> ProxyRequest:
        request, self._peeked = self._peeked, None
        if request is not None and self.remove(request):  # still waiting: the head peek() reported
            return request
        queue = self._next()
        if queue is None:
            raise IndexError("pop from an empty queue")
        request = queue.pop()
        if queue is self._on_time:
            self._left_on_time(request.band)
        else:
            self._left_late(request.band)
        return request

    def remove(self, request: ProxyRequest) -> bool:
        if self._on_time.remove(request):
            self._left_on_time(request.band)
            return True
        late = self._late.get(request.band)
        if late is not None and late.remove(request):
            self._left_late(request.band)
            return True
        return False

    def __len__(self) -> int:
        return len(self._on_time) + self._late_count

    def __bool__(self) -> bool:
        """Whether anything waits, without asking the on-time heap its length (every dispatch asks)."""
        return bool(self._on_time_bands) or self._late_count > 0

    def __iter__(self) -> Iterator[ProxyRequest]:
        yield from self._on_time
        for queue in self._late.values():
            yield from queue


def edf() -> Ordering:
    """Earliest deadline first: the TTFT deadline for interactive work, end-to-end for batch; work
    already past its deadline goes after work still on time (:class:`LateLastEDF`)."""
    return LateLastEDF()


class PriorityFair(Ordering):
    """Strict priority bands; inside a band, deficit round robin across tenants by tokens.

    Each tenant with waiting work gets ``quantum x weight`` tokens of credit per round and
    spends its estimated prompt + reply tokens per dispatch; :meth:`served` corrects the
    charge to the tokens actually used. Inside a tenant, lower request ``priority`` first,
    then arrival. A tenant whose queue empties leaves the round and loses its credit.
    """

    def __init__(self, quantum_tokens: int = 1024, weights: dict[str, float] | None = None) -> None:
        self.quantum = quantum_tokens
        self.weights = weights or {}
        self._bands: dict[int, dict[str, list[tuple[int, int, ProxyRequest]]]] = {}
        self._rings: dict[int, deque[str]] = {}
        self._band_heap: list[int] = []
        self._deficit: dict[tuple[int, str], float] = {}
        self._where: dict[int, tuple[int, str]] = {}  # id(request) -> (band, tenant)
        self._selected: tuple[int, str] | None = None

    # -- structure --------------------------------------------------------------------------
    def push(self, request: ProxyRequest) -> None:
        band, tenant = request.band, request.tenant
        tenants = self._bands.setdefault(band, {})
        if not tenants:
            heapq.heappush(self._band_heap, band)
        queue = tenants.get(tenant)
        if queue is None:
            queue = tenants[tenant] = []
            self._rings.setdefault(band, deque()).append(tenant)
            self._deficit[(band, tenant)] = 0.0
        heapq.heappush(queue, (request.priority, request.seq, request))
        self._where[id(request)] = (band, tenant)
        self._selected = None

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[ProxyRequest]:
        for tenants in self._bands.values():
            for queue in tenants.values():
                yield from (entry[2] for entry in queue if id(entry[2]) in self._where)

    def _head(self, band: int, tenant: str) -> ProxyRequest | None:
        queue = self._bands[band][tenant]
        while queue and id(queue[0][2]) not in self._where:
            heapq.heappop(queue)
        return queue[0][2] if queue else None

    def _drop_tenant(self, band: int, tenant: str) -> None:
        del self._bands[band][tenant]
        self._rings[band].remove(tenant)
        self._deficit.pop((band, tenant), None)
        if not self._bands[band]:
            del self._bands[band]
            del self._rings[band]
            self._band_heap.remove(band)
            heapq.heapify(self._band_heap)

    # -- selection --------------------------------------------------------------------------
    @staticmethod
    def cost(request: ProxyRequest) -> float:
        return float(request.est_prompt_tokens + request.est_output_tokens)

    def _select(self) -> tuple[int, str] | None:
        if self._selected is not None:
            return self._selected
        if not self._band_heap:
            return None
        band = self._band_heap[0]
        ring = self._rings[band]
        queues = self._bands[band]
        deficit, live, quantum, weights = self._deficit, self._where, self.quantum, self.weights
        while True:
            tenant = ring[0]
            queue = queues[tenant]
            while queue and id(queue[0][2]) not in live:  # drop removed entries
                heapq.heappop(queue)
            if not queue:
                self._drop_tenant(band, tenant)
                return self._select()
            head = queue[0][2]
            key = (band, tenant)
            if deficit[key] >= head.est_prompt_tokens + head.est_output_tokens:  # cost(), inlined
                self._selected = key
                return key
            deficit[key] += quantum * weights.get(tenant, 1.0)
            ring.rotate(-1)

    def peek(self) -> ProxyRequest | None:
        key = self._select()
        return None if key is None else self._head(*key)

    def pop(self) -> ProxyRequest:
        key = self._select()
        if key is None:
            raise IndexError("pop from an empty queue")
        band, tenant = key
        request = heapq.heappop(self._bands[band][tenant])[2]
        del self._where[id(request)]
        self._deficit[key] -= self.cost(request)
        self._selected = None
        if self._head(band, tenant) is None:
            self._drop_tenant(band, tenant)
        return request

    def remove(self, request: ProxyRequest) -> bool:
        where = self._where.pop(id(request), None)
        if where is None:
            return False
        self._selected = None
        if self._head(*where) is None:
            self._drop_tenant(*where)
        return True

    def served(self, request: ProxyRequest, tokens: int) -> None:
        key = (request.band, request.tenant)
        if key in self._deficit:  # still in the round: charge what was really used
            self._deficit[key] += self.cost(request) - tokens
