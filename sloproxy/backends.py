"""The proxy's view of each backend: adapter, health, live load, in-flight count.

Health checks and load polling run as background tasks on the proxy's event loop; every
probe has a timeout, so a hung backend is marked unhealthy rather than stalling anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from .adapters.base import BackendLoad, EngineAdapter
from .config import BackendConfig, ContextConfig, HealthConfig, LoadPolling
from .context import ContextWindow, place_by_window, quick_token_bound, reroute_after_refusal
from .plugins import load_adapter_class

if TYPE_CHECKING:
    from .errors import ProxyError
    from .outlier import Breaker
    from .request import ProxyRequest

log = logging.getLogger("sloproxy.backends")


@dataclass(eq=False)
class Backend:
    config: BackendConfig
    adapter: EngineAdapter
    # ``healthy`` is what routing reads (policies, queues, retries): the health checks pass and no
    # operator drains it. ``update_routable`` keeps it so; set the parts, never ``healthy`` itself.
    healthy: bool = True  # optimistic until the first probe says otherwise
    probe_healthy: bool = True  # the active health checks pass
    draining: bool = False  # admin: no new requests; those in flight finish
    # Told when health checks or the breaker take the backend out (the scheduler moves work off it).
    on_failed: Callable[[Backend], None] | None = field(default=None, repr=False)
    probe_healthy_was: bool = field(default=True, repr=False)
    ejected_was: bool = field(default=False, repr=False)
    # The circuit breaker (outlier.py) sends no new requests: ejected for failing them, or half open
    # with its trials all out. Apart from health checks: a backend can pass /health and fail requests.
    ejected: bool = False
    breaker: Breaker | None = None  # None: outlier detection off (and in the simulator)
    # Model swapping (swapping.py) holds it: asleep, or being drained, put to sleep or woken.
    asleep: bool = False
    swap_s: float | None = None  # measured seconds to bring it in (victim's sleep + its wake; planners read it)
    gpu_group: str | None = None  # = config.gpu_group: backends that take turns on the same GPUs
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    # Load as the policies see it: the whole fleet's proxies (with several replicas: this one's own
    # plus the others' as of the last state sync; with one, just this one's).
    in_flight: int = 0
    kv_reserved_tokens: int = 0  # sum over in-flight requests of prompt + predicted p90 reply (KV admission)
    kv_urgent_tokens: int = 0  # the band-0 part of it, this replica's (KV kept for interactive work)
    budget: int = 32  # dispatch budget (set and adapted by the scheduler)
    # This replica's part: what it has in flight, and what it may have (its share of the budget).
    mine: int = 0
    kv_mine: int = 0
    cap: int = 32
    urgent_cap: int = 32
    remote_in_flight: int = 0
    remote_kv_tokens: int = 0
    ceiling: int | None = None  # the engine's capacity as last observed (it queued beyond it)
    quiet_updates: int = 0
    probe_step: int = 1  # how far above the ceiling the next probe goes (doubles while probes hold)
    dispatched_since_reading: int = 0  # requests sent since the engine's last load reading
    load: BackendLoad | None = None
    load_read_at: float | None = None  # monotonic seconds
    load_reported: bool = True  # False: the engine's /metrics lacks its load figures (load unknown)
    stale_after_s: float = 5.0
    models: frozenset[str] = field(default_factory=frozenset)
    context: ContextWindow | None = None  # its window: from the config, else as the engine last reported it

    name: str = ""  # = config.name (a plain attribute: policies read it in hot loops)
    priority_scheduling: bool = False  # the engine orders by priority itself (hints are sent)
    urgent_budget: int = 32  # band-0 budget: a quarter more where the engine preempts by priority
    clock: Callable[[], float] = time.monotonic  # the simulator passes its virtual clock

    def __post_init__(self) -> None:
        self.name = self.config.name
        self.priority_scheduling = self.config.priority_scheduling
        self.gpu_group = self.config.gpu_group
        if self.config.max_context_tokens is not None:
            self.context = ContextWindow(self.config.max_context_tokens, source="config")

    @property
    def url(self) -> str:
        return self.config.url.rstrip("/")

    @property
    def load_is_stale(self) -> bool:
        return self.load_read_at is None or self.clock() - self.load_read_at > self.stale_after_s

    def update_routable(self) -> None:
        was_up = self.probe_healthy_was and not self.ejected_was
        self.healthy = self.probe_healthy and not self.draining and not self.ejected and not self.asleep
        self.probe_healthy_was, self.ejected_was = self.probe_healthy, self.ejected
        if was_up and (not self.probe_healthy or self.ejected) and self.on_failed is not None:
            self.on_failed(self)  # it failed (not drained or put to sleep): what it holds silently can move

    def record_probe(self, ok: bool, health: HealthConfig) -> None:
        if ok:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
            if not self.probe_healthy and self.consecutive_successes >= health.healthy_after:
                self.probe_healthy = True
                log.warning("backend %s is healthy again", self.name)
        else:
            self.consecutive_successes = 0
            self.consecutive_failures += 1
            if self.probe_healthy and self.consecutive_failures >= health.unhealthy_after:
                self.probe_healthy = False
                log.warning("backend %s marked unhealthy after %d failed checks", self.name, self.consecutive_failures)
        self.update_routable()


class BackendPool:
    """All backends, indexed by model; runs their health checks and load polling."""

    def __init__(
        self,
        configs: Iterable[BackendConfig],
        health: HealthConfig,
        polling: LoadPolling,
        clock: Callable[[], float] = time.monotonic,
        context: ContextConfig | None = None,
    ) -> None:
        self.health = health
        self.polling = polling
        self.context = context or ContextConfig()
        self._window_floors: dict[str, tuple[int, int]] = {}  # model -> its tightest prompt limit and window
        self.backends: list[Backend] = []
        self.by_model: dict[str, list[Backend]] = {}
        for config in configs:
            adapter = load_adapter_class(config.engine)(
                api_key=config.api_key, priority_scheduling=config.priority_scheduling
            )
            backend = Backend(
                config, adapter, stale_after_s=polling.stale_after_s, models=frozenset(config.models), clock=clock
            )
            self.backends.append(backend)
            for model in config.models:
                self.by_model.setdefault(model, []).append(backend)
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self.on_load_update: Callable[[Backend], None] | None = None  # the scheduler listens

    def models(self) -> list[str]:
        return sorted(self.by_model)

    def candidates(self, model: str, exclude: Iterable[Backend] = ()) -> list[Backend]:
        serving = self.by_model.get(model, ())
        if not exclude:
            return [b for b in serving if b.healthy]
        excluded = set(map(id, exclude))
        return [b for b in serving if b.healthy and id(b) not in excluded]

    def fit_by_window(self, request: ProxyRequest) -> None:
        """Narrow ``request`` to the backends whose context window holds it (context.py); raises the
        400 when none does. A request whose prompt and reply limit surely fit the model's tightest
        window (its body's size bounds its tokens) costs a dict lookup and two comparisons."""
        floor = self._window_floors.get(request.model)
        if floor is None:
            windows = [b.context for b in self.by_model.get(request.model, ()) if b.context is not None]
            floor = self._window_floors[request.model] = (
                min((w.prompt_limit for w in windows), default=sys.maxsize),
                min((w.total for w in windows), default=sys.maxsize),
            )
        quick = quick_token_bound(request)
        if quick <= floor[0] and quick + (request.max_tokens or 0) <= floor[1]:
            return
        place_by_window(request, self.by_model.get(request.model, ()), self.context.clamp_max_tokens)

    def reply_load(self, backend: Backend, headers: list[tuple[bytes, bytes]]) -> None:
        """A reply's own load report (vLLM's ORCA header): the figures it has replace the last reading's,
        which counts as fresh from now on; the budget controller still adapts on full readings only."""
        name = backend.adapter.reply_load_header
        value = next((v for n, v in headers if n.lower() == name), None)
        if value is None:
            return
        load = backend.adapter.parse_reply_load(value, backend.load)
        if load is not None:
            backend.load, backend.load_read_at = load, backend.clock()

    def set_context(self, backend: Backend, window: ContextWindow | None) -> None:
        """``backend``'s window from now on (learned from its engine)."""
        backend.context = window
        self._window_floors.clear()

    def reroute_after_refusal(self, request: ProxyRequest, backend: Backend, error: ProxyError) -> bool:
        """True if ``error`` is ``backend``'s refusal of ``request`` as too long and another backend of
        its model may hold it: the caller tries again (context.py)."""
        return reroute_after_refusal(
            request, backend.name, error, self.by_model.get(request.model, ()), self.context.clamp_max_tokens
        )

    def refresh(self) -> None:
        """Recompute every backend's ``healthy`` (what routing reads) from its parts; for callers
        that changed several."""
        for backend in self.backends:
            backend.update_routable()

    @property
    def ready(self) -> bool:
        return any(b.healthy for b in self.backends)

    def set_draining(self, name: str, draining: bool) -> Backend | None:
        """Drain (or bring back) the backend called ``name``; None if there is none."""
        for backend in self.backends:
            if backend.name == name:
                backend.draining = draining
                backend.update_routable()
                self.refresh()
                return backend
        return None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        await asyncio.gather(*(self.probe(b) for b in self.backends))
        self._tasks = [asyncio.create_task(self._health_loop(), name="health-checks")]
        if any(b.adapter.metrics_path for b in self.backends):
            self._tasks.append(asyncio.create_task(self._load_loop(), name="load-polling"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def probe(self, backend: Backend) -> bool:
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
            async with self._session.get(backend.url + backend.adapter.health_path, timeout=timeout) as response:
                await response.read()
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        backend.record_probe(ok, self.health)
        if ok and backend.adapter.context_path is not None and backend.config.max_context_tokens is None:
            await self.read_context(backend)  # an engine restarted with another window says so here
        return ok

    async def read_context(self, backend: Backend) -> None:
        """Learn ``backend``'s window from its engine; a failed read keeps the last one known."""
        assert self._session is not None and backend.adapter.context_path is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
            async with self._session.get(backend.url + backend.adapter.context_path, timeout=timeout) as response:
                body = await response.read()
                if response.status != 200:
                    return
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        window = backend.adapter.parse_context(body, backend.models)
        if window is not None and window != backend.context:
            if backend.context is not None:
                log.warning(
                    "backend %s: context window %d -> %d tokens", backend.name, backend.context.total, window.total
                )
            self.set_context(backend, window)

    async def read_load(self, backend: Backend) -> None:
        assert self._session is not None
        path = backend.adapter.metrics_path
        if path is None:
            return
        try:
            timeout = aiohttp.ClientTimeout(total=self.polling.timeout_s)
            async with self._session.get(backend.url + path, timeout=timeout) as response:
                if response.status != 200:
                    return
                text = await response.text()
            load = backend.adapter.parse_load(text)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return  # the reading simply grows stale
        backend.load_reported = load is not None
        if load is None:  # the engine answers without its load figures: unknown, as stale, never as idle
            backend.load, backend.load_read_at = None, None
        else:
            backend.load, backend.load_read_at = load, time.monotonic()
        if self.on_load_update is not None:
            self.on_load_update(backend)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health.interval_s)
            await asyncio.gather(*(self.probe(b) for b in self.backends))

    async def _load_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.read_load(b) for b in self.backends if b.healthy))
            await asyncio.sleep(self.polling.interval_s)
