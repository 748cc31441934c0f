"""Circuit breaking by passive outlier ejection: a backend that keeps failing requests stops getting them.

Health checks ask a backend whether it is up; this watches what its real requests do. A backend can
pass ``/health`` and still fail every request (a wedged engine, a broken model, garbage replies),
or flap between up and down faster than the health checks settle. Each backend has a breaker:

* **closed**: requests flow; ``consecutive_failures`` failed attempts in a row eject it.
* **open** (ejected): ``Backend.ejected`` makes it unroutable (``update_routable``: what
  ``BackendPool.candidates`` and the scheduler read), so nothing new goes to it. Requests already
  on it run on. After the ejection time it goes half open.
* **half open**: up to ``half_open_requests`` trial requests at a time. The first trial to succeed
  closes the breaker; one that fails ejects it again, for twice as long (``base_ejection_s`` doubling
  up to ``max_ejection_s``; the doubling resets once it has stayed closed for ``max_ejection_s``).

A failure is what the backend did wrong: no connection, a reset, a 5xx (but 503), a reply or stream
the adapter cannot read, a stream cut short, a timeout. Not a failure: 4xx (the client's request),
429 and 503 (the engine's own admission: vLLM's and SGLang's queue limits answer 503; ejecting a
merely busy engine would pour its load onto the others), a client that went away, an eviction.

Ejection never leaves a model without a backend: at most ``max_ejected_fraction`` of the backends
serving any of its models are ejected at once, and at least one other routable backend must remain;
a failure that would break that is counted (``sloproxy_backend_ejections_refused``) and the backend
stays in. Per request the cost is a few attribute reads and, while half open, one set lookup.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

from .backends import Backend, BackendPool
from .config import OutlierConfig

log = logging.getLogger("sloproxy.outlier")
State = Literal["closed", "open", "half_open"]


class Breaker:
    """One backend's breaker state. The scheduler reads ``half_open`` on every dispatch."""

    __slots__ = (
        "backend",
        "closed_at",
        "detector",
        "ejected_until",
        "ejections",
        "failures",
        "half_open",
        "last_failure",
        "refused",
        "refused_logged",
        "state",
        "timer",
        "total_ejections",
        "trials",
    )

    def __init__(self, detector: OutlierDetector, backend: Backend) -> None:
        self.detector = detector
        self.backend = backend
        self.state: State = "closed"
        self.half_open = False
        self.failures = 0  # consecutive, while closed
        self.ejections = 0  # in a row: sets the next ejection's length
        self.total_ejections = 0
        self.refused = 0  # ejections refused to keep a model served
        self.refused_logged = False
        self.closed_at = -math.inf
        self.ejected_until: float | None = None  # monotonic seconds, while open
        self.last_failure = ""
        self.trials: set[int] = set()  # id() of the trial requests in flight while half open
        self.timer: asyncio.TimerHandle | None = None

    def trial_started(self, key: int) -> None:
        """The scheduler dispatched a trial request here (called only while half open)."""
        self.trials.add(key)
        if len(self.trials) >= self.detector.config.half_open_requests and not self.backend.ejected:
            self.backend.ejected = True  # every trial slot is out: no more until one reports
            self.backend.update_routable()

    def trial_ended(self, key: int) -> None:
        """A trial ended without a verdict (client gone, 4xx, or released unreported): its slot is free."""
        if key not in self.trials:
            return
        self.trials.discard(key)
        if self.half_open and self.backend.ejected:
            self.backend.ejected = False
            self.backend.update_routable()


class OutlierDetector:
    """The breakers of all backends in a pool; ``record`` is called once per attempt by the forwarder."""

    def __init__(self, config: OutlierConfig, pool: BackendPool, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pool = pool
        self.clock = clock
        for backend in pool.backends:
            backend.breaker = Breaker(self, backend)

    def stop(self) -> None:
        for backend in self.pool.backends:
            breaker = backend.breaker
            if breaker is not None and breaker.timer is not None:
                breaker.timer.cancel()
                breaker.timer = None

    def record(self, backend: Backend, key: int, ok: bool | None, reason: str = "") -> None:
        """One attempt on ``backend`` ended: ``ok`` True (served), False (the backend failed), None
        (says nothing about the backend). ``key`` is ``id()`` of the request (trials are told apart)."""
        breaker = backend.breaker
        if breaker is None:
            return
        if breaker.state == "closed":
            if ok:
                breaker.failures = 0
            elif ok is False:
                breaker.failures += 1
                breaker.last_failure = reason
                if breaker.failures >= self.config.consecutive_failures:
                    self._eject(breaker)
            return
        if not breaker.trials or key not in breaker.trials:
            return  # open, or half open and not a trial: stragglers from before the ejection say nothing
        if ok:
            self._close(breaker)
        elif ok is False:
            breaker.last_failure = reason
            self._eject(breaker)
        else:
            breaker.trial_ended(key)

    # ----- transitions ----------------------------------------------------------------------------
    def _eject(self, breaker: Breaker) -> None:
        backend = breaker.backend
        now = self.clock()
        if not self._may_eject(backend):
            breaker.refused += 1
            if not breaker.refused_logged:
                breaker.refused_logged = True
                log.warning(
                    "backend %s keeps failing (%s) but stays in: its models would have too few backends left",
                    backend.name,
                    breaker.last_failure,
                )
            if breaker.state == "half_open":  # nowhere else to go: serve through it, judged afresh
                self._close(breaker, quiet=True)
            return
        config = self.config
        if breaker.state == "closed" and now - breaker.closed_at >= config.max_ejection_s:
            breaker.ejections = 0  # well behaved for long enough: the doubling starts over
        duration = min(config.base_ejection_s * 2.0**breaker.ejections, config.max_ejection_s)
        failures = breaker.failures
        breaker.ejections += 1
        breaker.total_ejections += 1
        breaker.state = "open"
        breaker.half_open = False
        breaker.failures = 0
        breaker.refused_logged = False
        breaker.trials.clear()
        breaker.ejected_until = now + duration
        backend.ejected = True
        backend.update_routable()
        breaker.timer = asyncio.get_running_loop().call_later(duration, self._half_open, breaker)
        log.warning(
            "backend %s ejected for %gs (%s; ejection %d in a row): %s",
            backend.name,
            duration,
            f"{failures} failures in a row" if failures else "a trial request failed",
            breaker.ejections,
            breaker.last_failure,
        )

    def _half_open(self, breaker: Breaker) -> None:
        breaker.timer = None
        breaker.state = "half_open"
        breaker.half_open = True
        breaker.ejected_until = None
        breaker.backend.ejected = False
        breaker.backend.update_routable()
        log.warning(
            "backend %s back on probation: up to %d trial requests decide",
            breaker.backend.name,
            self.config.half_open_requests,
        )

    def _close(self, breaker: Breaker, quiet: bool = False) -> None:
        breaker.state = "closed"
        breaker.half_open = False
        breaker.failures = 0
        breaker.closed_at = self.clock()
        breaker.trials.clear()
        breaker.backend.ejected = False
        breaker.backend.update_routable()
        if not quiet:
            log.warning("backend %s returned to service: a trial request succeeded", breaker.backend.name)

    def _may_eject(self, backend: Backend) -> bool:
        """Ejecting ``backend`` keeps every model it serves within ``max_ejected_fraction`` and with
        another routable backend."""
        for model in backend.models:
            serving = self.pool.by_model[model]
            ejected = sum(1 for b in serving if b.breaker is not None and b.breaker.state == "open")
            if ejected + 1 > math.floor(self.config.max_ejected_fraction * len(serving) + 1e-9):
                return False
            if not any(b is not backend and b.healthy for b in serving):
                return False
        return True

    def states(self) -> list[tuple[str, Breaker]]:
        """(backend name, breaker) for metrics and admin views."""
        return [(b.name, b.breaker) for b in self.pool.backends if b.breaker is not None]
