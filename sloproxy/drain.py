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

A class served behind another (batch behind interactive) drains at whatever the classes ahead leave,
so its own rate while it waits says how busy they were lately, not what it will get once a burst of
theirs has passed. Its wait is therefore projected from the model as a whole (:meth:`wait_behind_s`):
everything ahead of it (the classes ahead's waiters and its own) served at the rate the model drains
at while busy, less what the classes ahead take on average (their dispatches over all time, not only
busy time). Under sustained overload the two projections agree; behind a passing burst the class's own
rate projected waits of minutes for batch that least-load served at once (one model on KV-bound A10s,
Azure conv at 0.65x least-load's capacity: 12 batch requests shed, then 9 interactive ones refused as
the misses fed ``slo``'s refusal, where least-load met every SLO).
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

    def widen(self, other: _Window) -> None:
        """Keep at least ``other``'s memory and trust (what was counted so far stays)."""
        self.half_life_s = max(self.half_life_s, other.half_life_s)
        self.trust_s = max(self.trust_s, other.trust_s)


class DrainRates:
    def __init__(self, half_life_s: float = 20.0) -> None:
        self.half_life_s = half_life_s
        self.waiting: Counter[Key] = Counter()
        self._model_waiting: Counter[str] = Counter()  # waiters of every class of a model
        self._windows: dict[Key, _Window] = {}
        # Per model: dispatches of every class while any of them waits (the model's rate when busy) ...
        self._models: dict[str, _Window] = {}
        # ... and per (model, class): dispatches over all time, queued or not (what a class takes on
        # average; every second counts as busy). A model's windows share the memory of its longest
        # projection horizon, so what the classes ahead take is averaged over the wait it is used for.
        self._taken: dict[Key, _Window] = {}
        self._last: float | None = None

    def _window(self, key: Key, horizon_s: float | None = None) -> _Window:
        window = self._windows.get(key)
        if window is None:
            half_life = max(self.half_life_s, horizon_s or 0.0)
            trust = max(0.1 * half_life, 0.5 * (horizon_s or 0.0))
            window = self._windows[key] = _Window(half_life, trust)
            self._model_window(key[0]).widen(window)
            for (model, _), taken in self._taken.items():
                if model == key[0]:
                    taken.widen(window)
        return window

    def _model_window(self, model: str) -> _Window:
        window = self._models.get(model)
        if window is None:
            window = self._models[model] = _Window(self.half_life_s, 0.1 * self.half_life_s)
        return window

    def joined(self, key: Key, horizon_s: float | None = None) -> None:
        """A request of ``key`` started waiting. ``horizon_s``: the longest wait its class's rate is
        projected over (its deadline), read when the key is first seen."""
        self._window(key, horizon_s)
        self.waiting[key] += 1
        self._model_waiting[key[0]] += 1

    def left(self, key: Key) -> None:
        self.waiting[key] -= 1
        self._model_waiting[key[0]] -= 1

    def served(self, key: Key) -> None:
        """A waiting request of ``key`` was dispatched (call :meth:`left` too)."""
        self._window(key).served += 1.0

    def dispatched(self, key: Key) -> None:
        """A request of ``key`` went to a backend, from the queue or on arrival (the model's busy rate
        counts it only while some of the model's work waits: a dispatch into an idle fleet says
        nothing of its capacity)."""
        taken = self._taken.get(key)
        if taken is None:
            model = self._model_window(key[0])
            taken = self._taken[key] = _Window(model.half_life_s, model.trust_s)
        taken.served += 1.0
        if self._model_waiting[key[0]] > 0:
            self._models[key[0]].served += 1.0

    def advance(self, now: float) -> None:
        """Age the windows to ``now``; time since the last call counts as busy for queues with waiters."""
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        for key, window in self._windows.items():
            _decay(window, now - last, self.waiting[key] > 0)
        for window in self._taken.values():
            _decay(window, now - last, True)
        for model, window in self._models.items():
            _decay(window, now - last, self._model_waiting[model] > 0)

    def rate(self, key: Key) -> float | None:
        """Requests per second ``key``'s queue drained at while it had waiters (None: too little seen)."""
        window = self._windows.get(key)
        if window is None or window.busy_s < window.trust_s:
            return None
        return window.served / window.busy_s

    def wait_behind_s(self, key: Key, ahead: int, classes_ahead: list[str]) -> float | None:
        """Expected wait of a request of ``key`` with ``ahead`` of its own class before it, served after
        every waiter of ``classes_ahead`` (same model): all of them at the model's busy rate less what
        those classes take on average. None while too little was seen to judge; infinite when the
        classes ahead take all the model drains."""
        outlook = self.behind(key, classes_ahead)
        if outlook is None:
            return None
        waiting_ahead, spare = outlook
        return (waiting_ahead + ahead + 1) / spare if spare > 0 else math.inf

    def behind(self, key: Key, classes_ahead: list[str]) -> tuple[int, float] | None:
        """What :meth:`wait_behind_s` projects from, for a caller judging many requests of ``key`` at
        once: the waiters of ``classes_ahead`` and the rate the model leaves ``key``'s class (requests
        per second; <= 0 when the classes ahead take it all). None while too little was seen."""
        model = self._models.get(key[0])
        if model is None or model.busy_s < model.trust_s or model.served <= 0:
            return None
        spare = model.served / model.busy_s
        waiting_ahead = 0
        for name in classes_ahead:
            other = (key[0], name)
            waiting_ahead += self.waiting[other]
            taken = self._taken.get(other)
            if taken is not None:  # a class first seen a moment ago is averaged over the trust period
                spare -= taken.served / max(taken.busy_s, taken.trust_s, 1e-9)
        return waiting_ahead, spare

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


def _decay(window: _Window, elapsed_s: float, busy: bool) -> None:
    """Age ``window`` by ``elapsed_s``; the interval counts as busy time (decayed as it passed) if ``busy``."""
    keep = 0.5 ** (elapsed_s / window.half_life_s)
    window.busy_s *= keep
    window.served *= keep
    if busy:
        window.busy_s += window.half_life_s / math.log(2) * (1.0 - keep)
