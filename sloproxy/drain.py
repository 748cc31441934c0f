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

The window of a queue fits the horizon its rate is projected over. A queue whose class has a
deadline projects waits up to that deadline, so its window is at least that long and its rate is
trusted only after half the deadline of busy time. Trusted after 2 s, a batch queue behind an
interactive burst drained at 0.2-1 requests/s and projected waits of 55-330 s for work that was
then served within 5-15 s, once the burst had passed (demo fleet, Azure conv x4): shedding on that
early rate refused half the batch that would have met its 60 s deadline (``bench/shedding.py``).
"""

from __future__ import annotations

import math
from collections import Counter

Key = tuple[str, str]  # (model, class)


class _Window:
    """One queue's decaying record: dispatches and busy seconds, with its own memory."""

    __slots__ = ("busy_s", "half_life_s", "served", "trust_s")

    def __init__(self, half_life_s: float, trust_s: float) -> None:
        self.half_life_s = half_life_s
        self.trust_s = trust_s  # busy seconds observed before the rate is trusted
        self.served = 0.0  # decayed count of dispatches from the queue
        self.busy_s = 0.0  # decayed seconds with at least one waiter


class DrainRates:
    def __init__(self, half_life_s: float = 20.0) -> None:
        self.half_life_s = half_life_s
        self.waiting: Counter[Key] = Counter()
        self._windows: dict[Key, _Window] = {}
        self._last: float | None = None

    def _window(self, key: Key, horizon_s: float | None = None) -> _Window:
        window = self._windows.get(key)
        if window is None:
            half_life = max(self.half_life_s, horizon_s or 0.0)
            trust = max(0.1 * half_life, 0.5 * (horizon_s or 0.0))
            window = self._windows[key] = _Window(half_life, trust)
        return window

    def joined(self, key: Key, horizon_s: float | None = None) -> None:
        """A request of ``key`` started waiting. ``horizon_s``: the longest wait its class's rate is
        projected over (its deadline), read when the key is first seen."""
        self._window(key, horizon_s)
        self.waiting[key] += 1

    def left(self, key: Key) -> None:
        self.waiting[key] -= 1

    def served(self, key: Key) -> None:
        """A waiting request of ``key`` was dispatched (call :meth:`left` too)."""
        self._window(key).served += 1.0

    def advance(self, now: float) -> None:
        """Age the windows to ``now``; time since the last call counts as busy for queues with waiters."""
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        for key, window in self._windows.items():
            keep = 0.5 ** ((now - last) / window.half_life_s)
            window.busy_s *= keep
            window.served *= keep
            if self.waiting[key] > 0:  # the interval's busy time, decayed as it passed
                window.busy_s += window.half_life_s / math.log(2) * (1.0 - keep)

    def rate(self, key: Key) -> float | None:
        """Requests per second ``key``'s queue drained at while it had waiters (None: too little seen)."""
        window = self._windows.get(key)
        if window is None or window.busy_s < window.trust_s:
            return None
        return window.served / window.busy_s

    def wait_s(self, key: Key) -> float | None:
        """Expected wait of a request joining ``key``'s queue now: those already waiting divided by the
        rate it drained at. 0 with nobody waiting; None while too little busy time was seen to judge;
        infinite when nothing left the busy queue for a backend during the whole window."""
        ahead = self.waiting[key]
        if ahead <= 0:
            return 0.0
        window = self._windows.get(key)
        if window is None or window.busy_s < window.trust_s:
            return None
        return ahead * window.busy_s / window.served if window.served > 0 else math.inf
