"""How fast each (model, SLO class) queue drains, so the scheduler can tell at arrival how long a
request would wait behind the ones of its class already waiting.

Under sustained overload a sheddable request that joins a long queue would otherwise wait there
until its deadline is about to pass and only then be shed (measured, ``bench/overload.py``: batch
got its 429 after 52 s of a 60 s deadline at 5x capacity, holding memory and a connection the whole
time). With this estimate it is refused at once, with ``Retry-After``.

The rate is requests leaving the queue for a backend per second *while the queue had waiters*
(idle time says nothing about capacity), over an exponentially decaying window so it follows the
fleet as capacity changes. Events cost O(1); the window advances on the scheduler's timer, which
visits only the (model, class) pairs seen (a handful).
"""

from __future__ import annotations

import math
from collections import Counter

Key = tuple[str, str]  # (model, class)


class DrainRates:
    def __init__(self, half_life_s: float = 20.0) -> None:
        self.half_life_s = half_life_s
        self.min_busy_s = 0.1 * half_life_s  # busy time observed before the rate is trusted
        self.waiting: Counter[Key] = Counter()
        self._served: dict[Key, float] = {}  # decayed count of dispatches from the queue
        self._busy_s: dict[Key, float] = {}  # decayed seconds with at least one waiter
        self._last: float | None = None

    def joined(self, key: Key) -> None:
        self.waiting[key] += 1

    def left(self, key: Key) -> None:
        self.waiting[key] -= 1

    def served(self, key: Key) -> None:
        """A waiting request of ``key`` was dispatched (call :meth:`left` too)."""
        self._served[key] = self._served.get(key, 0.0) + 1.0

    def advance(self, now: float) -> None:
        """Age the window to ``now``; time since the last call counts as busy for queues with waiters."""
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        keep = 0.5 ** ((now - last) / self.half_life_s)
        busy = self.half_life_s / math.log(2) * (1.0 - keep)  # the interval's busy time, decayed as it passed
        for key in self._busy_s:
            self._busy_s[key] *= keep
            self._served[key] = self._served.get(key, 0.0) * keep
        for key, count in self.waiting.items():
            if count > 0:
                self._busy_s[key] = self._busy_s.get(key, 0.0) + busy

    def rate(self, key: Key) -> float | None:
        """Requests per second ``key``'s queue drained at while it had waiters (None: too little seen)."""
        busy = self._busy_s.get(key, 0.0)
        if busy < self.min_busy_s:
            return None
        return self._served.get(key, 0.0) / busy

    def wait_s(self, key: Key) -> float | None:
        """Expected wait of a request joining ``key``'s queue now: those already waiting divided by the
        rate it drained at. 0 with nobody waiting; None while too little busy time was seen to judge;
        infinite when nothing left the busy queue for a backend during the whole window."""
        ahead = self.waiting[key]
        if ahead <= 0:
            return 0.0
        busy = self._busy_s.get(key, 0.0)
        if busy < self.min_busy_s:
            return None
        served = self._served.get(key, 0.0)
        return ahead * busy / served if served > 0 else math.inf
