"""Model swapping: backends that share a GPU group take turns being awake.

Several engine instances (one per model) can share one group of GPUs when only
``swapping.awake_per_group`` of them (usually one) hold their weights at a time; the others sleep
(vLLM ``/sleep``, SGLang's memory release, or restart hooks for engines without either). A
sleeping backend is not routable (``Backend.asleep`` folds into ``Backend.healthy``), but a request
for its model does not fail: the scheduler queues it while a swap brings the model in
(:meth:`Swapper.wakeable`), bounded by the usual queue timeout.

A swap drains the victim (no new requests; those in flight finish: nothing is aborted), puts it to
sleep, wakes the target and makes it routable. A victim still busy after ``drain_timeout_s`` gets
its requests back and the swap is called off: stranding a client is worse than a late wake. Each
sleep and wake is timed; the per-backend EWMA is exported and written to ``Backend.swap_s`` so
planners (QLM) read measured swap costs instead of a fixed guess.

When to swap (:func:`choose_victim`, the default for every policy): a model has requests waiting
and no routable backend, and one of its backends sleeps. If the sleeper's group has room, wake it.
Otherwise swap out the group's awake member that is, in this order of preference:

1. idle: nothing in flight and nothing waiting for its models;
2. served elsewhere: each of its models has another routable backend;
3. less urgent: awake at least ``min_awake_s`` (no ping-pong), and nothing waits for its models
   or the most urgent waiting request of the wanted model outranks theirs (band, then deadline).

With placement on (placement_loop.py), measured demand comes first: the group whose least
asked-for resident is least asked for is tried first, and in it the least asked-for eligible
member goes, so a model with steady traffic is not evicted for a rare one just because it was
idle at that instant.

None qualifies: the requests wait, and the rule runs again on the next timer turn. A policy can ask
for a swap (:class:`~sloproxy.policies.base.Swap`) naming the victim; it is carried out when the
victim is idle, served elsewhere or past ``min_awake_s`` (the policy judged urgency itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .adapters.base import AdminCall
from .backends import Backend, BackendPool
from .config import SwappingConfig

if TYPE_CHECKING:
    from .policies.base import Swap
    from .request import ProxyRequest

log = logging.getLogger("sloproxy.swapping")
Urgency = tuple[int, float]  # (band, earliest deadline): smaller is more urgent
LEAST_URGENT: Urgency = (1 << 30, math.inf)


@dataclass(slots=True)
class Demand:
    """What waits for one model: how many, and the most urgent of them."""

    waiting: int = 0
    urgency: Urgency = LEAST_URGENT

    def add(self, request: ProxyRequest) -> None:
        self.waiting += 1
        deadline = request.urgent_deadline if request.urgent_deadline is not None else math.inf
        self.urgency = min(self.urgency, (request.band, deadline))


def demand_of(requests: Iterable[ProxyRequest]) -> dict[str, Demand]:
    demand: dict[str, Demand] = {}
    for request in requests:
        entry = demand.get(request.model)
        if entry is None:
            entry = demand[request.model] = Demand()
        entry.add(request)
    return demand


@dataclass(frozen=True, slots=True)
class VictimView:
    """An awake group member as the swap rule sees it."""

    name: str
    in_flight: int
    demand: Demand  # waiting for any of its models
    served_elsewhere: bool  # each of its models has another routable backend
    awake_for_s: float
    demand_rps: float = 0.0  # measured arrivals for its models (placement on; else 0 for all)


def choose_victim(
    wanted: Demand,
    members: Sequence[VictimView],
    min_awake_s: float,
    forced: str | None = None,
    wanted_rps: float | None = None,
) -> tuple[str, str] | None:
    """The member to swap out for a model with demand ``wanted``, and why; None: none may go.
    ``forced``: a policy's choice, accepted unless it is busy and woke less than ``min_awake_s`` ago.

    ``wanted_rps``: the wanted model's measured requests/s (placement on). Then the least asked-for
    eligible member goes first, and a busy member is only drained for a model asked for at least as
    often: draining a model with steady traffic for a rare request only brings its next requests
    back for another swap (thrash); the rare request waits for an idle member instead."""
    best: tuple[float, int, int, str, str] | None = None
    for member in members:
        if member.in_flight == 0 and member.demand.waiting == 0:
            rank, reason = 0, "idle"
        elif member.served_elsewhere:
            rank, reason = 1, "its models are served elsewhere"
        elif (
            member.awake_for_s >= min_awake_s
            and (forced == member.name or member.demand.waiting == 0 or wanted.urgency < member.demand.urgency)
            and (forced == member.name or wanted_rps is None or member.demand_rps <= wanted_rps)
        ):
            rank, reason = 2, "planned by the policy" if forced == member.name else "less urgent demand"
        else:
            continue
        if forced is not None and member.name != forced:
            continue
        key = (0.0 if wanted_rps is None else member.demand_rps, rank, member.in_flight, member.name, reason)
        if best is None or key < best:
            best = key
    return None if best is None else (best[3], best[4])


def _no_demand(model: str) -> float:  # the default: nothing measures demand (placement off)
    return 0.0


class SwapCosts:
    """Measured sleep and wake durations per backend, smoothed (EWMA)."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.sleep: dict[str, float] = {}
        self.wake: dict[str, float] = {}
        self.last: dict[tuple[str, str], float] = {}  # (kind, backend) -> the latest raw measurement

    def observe(self, kind: str, name: str, seconds: float) -> None:
        table = self.sleep if kind == "sleep" else self.wake
        old = table.get(name)
        table[name] = seconds if old is None else old + self.smoothing * (seconds - old)
        self.last[(kind, name)] = seconds


class Swapper:
    """Owns the sleep state of grouped backends and carries out swaps (one at a time per group)."""

    def __init__(self, pool: BackendPool, config: SwappingConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.config = config
        self.clock = clock
        self.groups: dict[str, list[Backend]] = {}
        for backend in pool.backends:
            if backend.config.gpu_group is not None:
                self.groups.setdefault(backend.config.gpu_group, []).append(backend)
        self.group_of = {b.name: g for g, members in self.groups.items() for b in members}
        self.costs = SwapCosts(config.cost_smoothing)
        self.counts: Counter[str] = Counter()  # swaps by outcome: done, abandoned, failed, declined
        self.awake_since: dict[str, float] = {}
        self.busy: set[str] = set()  # groups with a swap under way
        # Set by the scheduler: requests waiting in its queues; dispatch when a backend becomes routable.
        self.waiting: Callable[[], Iterable[ProxyRequest]] = lambda: ()
        self.on_routable: Callable[[Backend], None] = lambda backend: None
        # Set by placement when it runs: measured requests/s of a model, to spare busy-by-rate victims.
        self.demand_rate: Callable[[str], float] = _no_demand
        self._held: dict[int, ProxyRequest] = {}  # requests of unqueued policies waiting in routable()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._pending = False
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    # ----- lifecycle ------------------------------------------------------------------------------
    async def start(self, interval_s: float = 0.25) -> None:
        """Read each grouped backend's sleep state, put any group's extra awake members to sleep, and
        start the timer that re-checks waiting demand. Call after the pool's first health probes."""
        if not self.enabled:
            return
        self._session = aiohttp.ClientSession(auto_decompress=False)
        states = await asyncio.gather(*(self._read_asleep(b) for g in self.groups.values() for b in g))
        members = [b for g in self.groups.values() for b in g]
        now = self.clock()
        for backend, asleep in zip(members, states, strict=True):
            backend.asleep = asleep
            if not asleep:
                self.awake_since[backend.name] = now
        extra = []
        for group in self.groups.values():
            awake = [b for b in group if not b.asleep]
            extra += awake[self.config.awake_per_group :]
        for backend in extra:
            group, limit = backend.config.gpu_group, self.config.awake_per_group
            log.warning("group %s: more than %d awake at start; %s goes to sleep", group, limit, backend.name)
            backend.asleep = True
            seconds = await self._run(backend, "sleep")
            if seconds is not None:
                self.costs.observe("sleep", backend.name, seconds)
        self.pool.refresh()
        self._update_costs()
        self._loop_task = asyncio.create_task(self._loop(interval_s), name="swapper")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.consider()
            except Exception:  # a bug here must not stop the timer: requests would wait for nothing
                log.exception("swap decision failed")

    # ----- what the scheduler asks --------------------------------------------------------------------
    def wakeable(self, model: str) -> bool:
        """Some backend of ``model`` sleeps (or is being swapped) and can be woken: a request for it
        should wait for the swap rather than fail."""
        return any(self._can_wake(b) for b in self.pool.by_model.get(model, ()))

    def _can_wake(self, backend: Backend) -> bool:
        if not backend.asleep or backend.name not in self.group_of or backend.draining or backend.ejected:
            return False
        return backend.probe_healthy or backend.adapter.wake_call() is None  # a stopped engine fails /health

    def want(self, model: str | None = None) -> None:
        """A request (for ``model``) waits with nothing routable: decide on the loop's next turn (coalesced)."""
        if not self._pending and self.enabled:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._decide_soon)

    def _decide_soon(self) -> None:
        self._pending = False
        self.consider()

    async def routable(self, request: ProxyRequest, timeout_s: float) -> bool:
        """For policies without a queue: wait until ``request``'s model has a routable backend."""
        deadline = self.clock() + timeout_s
        self._held[id(request)] = request
        try:
            self.want(request.model)
            while not any(b.healthy for b in self.pool.by_model.get(request.model, ())):
                left = deadline - self.clock()
                if left <= 0 or not self.wakeable(request.model):
                    return False
                event = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
            return True
        finally:
            self._held.pop(id(request), None)

    # ----- deciding ----------------------------------------------------------------------------------
    def consider(self) -> None:
        """The default rule: wake a sleeping backend for each model that has requests waiting and
        nothing routable, most urgent model first (see the module doc)."""
        if not self.enabled:
            return
        demand = demand_of(self._demand_requests())
        for model, wanted in sorted(demand.items(), key=lambda item: item[1].urgency):
            if any(b.healthy for b in self.pool.by_model.get(model, ())):
                continue
            for target in self._targets(model):
                if self._try_swap(target, wanted, demand, None):
                    break

    def request(self, action: Swap) -> bool:
        """A policy's swap: carried out if the target sleeps, its group is free and the victim may go."""
        target = next((b for b in self.pool.backends if b.name == action.backend), None)
        if target is None or action.model not in target.models or not self._can_wake(target):
            self.counts["declined"] += 1
            return False
        demand = demand_of(self._demand_requests())
        started = self._try_swap(target, demand.get(action.model, Demand()), demand, action.victim)
        if started:
            log.info("swap requested by the policy: %s", action.reason)
        else:
            self.counts["declined"] += 1
        return started

    def _demand_requests(self) -> Iterator[ProxyRequest]:
        yield from self.waiting()
        yield from self._held.values()

    def _targets(self, model: str) -> list[Backend]:
        """Sleeping backends of ``model`` whose group is free: with measured demand, in the group whose
        residents are least asked for first; then the cheapest to wake."""
        targets = [b for b in self.pool.by_model.get(model, ()) if self._can_wake(b)]
        targets = [b for b in targets if self.group_of[b.name] not in self.busy]
        return sorted(
            targets,
            key=lambda b: (
                self._resident_demand(self.group_of[b.name]),
                self.costs.wake.get(b.name, b.config.sleep_level * 1e6),
                b.name,
            ),
        )

    def _measured_rps(self, backend: Backend) -> float | None:
        """Measured requests/s for ``backend``'s models; None while nothing measures demand."""
        if self.demand_rate is _no_demand:
            return None
        return sum(self.demand_rate(model) for model in backend.models)

    def _resident_demand(self, group: str) -> float:
        """Measured requests/s of the least asked-for awake member (0 with room, or without placement)."""
        awake = [b for b in self.groups[group] if not b.asleep]
        if len(awake) < self.config.awake_per_group:
            return 0.0
        return min(sum(self.demand_rate(m) for m in b.models) for b in awake)

    def _try_swap(self, target: Backend, wanted: Demand, demand: dict[str, Demand], forced: str | None) -> bool:
        group = self.group_of[target.name]
        if group in self.busy:
            return False
        awake = [b for b in self.groups[group] if not b.asleep]
        victim: Backend | None = None
        reason = "the group has room"
        if len(awake) >= self.config.awake_per_group:
            views = [self._view(b, demand) for b in awake]
            wanted_rps = self._measured_rps(target)
            chosen = choose_victim(wanted, views, self.config.min_awake_s, forced, wanted_rps)
            if chosen is None:
                return False
            name, reason = chosen
            victim = next(b for b in awake if b.name == name)
        self.busy.add(group)
        task = asyncio.create_task(self._swap(group, target, victim, reason), name=f"swap-{group}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _view(self, backend: Backend, demand: dict[str, Demand]) -> VictimView:
        mine = Demand()
        for model in backend.models:
            entry = demand.get(model)
            if entry is not None:
                mine.waiting += entry.waiting
                mine.urgency = min(mine.urgency, entry.urgency)
        elsewhere = all(
            any(b.healthy and b is not backend for b in self.pool.by_model.get(model, ())) for model in backend.models
        )
        return VictimView(
            backend.name,
            backend.in_flight,
            mine,
            elsewhere,
            self.clock() - self.awake_since.get(backend.name, 0.0),
            sum(self.demand_rate(model) for model in backend.models),
        )

    # ----- swapping ----------------------------------------------------------------------------------
    async def _swap(self, group: str, target: Backend, victim: Backend | None, reason: str) -> None:
        try:
            if victim is not None:
                log.info("group %s: swapping %s out (%s) for %s", group, victim.name, reason, target.name)
                victim.asleep = True  # drain: no new requests; those in flight finish
                self._refreshed()
                if not await self._drained(victim):
                    limit = self.config.drain_timeout_s
                    log.warning("group %s: %s still busy after %gs; swap called off", group, victim.name, limit)
                    self.counts["abandoned"] += 1
                    self._back_in(victim)
                    return
                seconds = await self._run(victim, "sleep")
                if seconds is None:
                    self.counts["failed"] += 1
                    self._back_in(victim)
                    return
                self.costs.observe("sleep", victim.name, seconds)
                self.awake_since.pop(victim.name, None)
            else:
                log.info("group %s: waking %s (%s)", group, target.name, reason)
            seconds = await self._run(target, "wake")
            if seconds is None:
                self.counts["failed"] += 1  # both now sleep; waiting demand wakes one of them next
                return
            self.costs.observe("wake", target.name, seconds)
            self.counts["done"] += 1
            self._back_in(target)
        finally:
            self.busy.discard(group)
            self._update_costs()
            self._refreshed()
            self.want()  # other models may be waiting for this group

    async def _drained(self, backend: Backend) -> bool:
        deadline = self.clock() + self.config.drain_timeout_s
        while backend.in_flight > 0:
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _back_in(self, backend: Backend) -> None:
        """Routable again, with a new residency (so a busy one is not swapped out again at once)."""
        backend.asleep = False
        self.awake_since[backend.name] = self.clock()
        self._refreshed()
        self.on_routable(backend)

    def _refreshed(self) -> None:
        """Routability changed: recompute it, and wake whoever waits in :meth:`routable`."""
        self.pool.refresh()
        self._changed.set()
        self._changed = asyncio.Event()

    def _update_costs(self) -> None:
        """``Backend.swap_s``: bringing this one in costs its wake plus a typical sleep of its group."""
        for members in self.groups.values():
            sleeps = [self.costs.sleep[b.name] for b in members if b.name in self.costs.sleep]
            typical_sleep = sum(sleeps) / len(sleeps) if sleeps else 0.0
            for backend in members:
                wake = self.costs.wake.get(backend.name)
                backend.swap_s = None if wake is None else wake + typical_sleep

    # ----- engine calls -------------------------------------------------------------------------------
    async def _run(self, backend: Backend, kind: str) -> float | None:
        """Put ``backend`` to sleep or wake it; the seconds it took, or None if it failed."""
        adapter = backend.adapter
        call = adapter.sleep_call(backend.config.sleep_level) if kind == "sleep" else adapter.wake_call()
        started = time.monotonic()
        try:
            if call is not None:
                await self._call(backend, call)
            else:
                command = backend.config.sleep_command if kind == "sleep" else backend.config.wake_command
                assert command is not None  # config.py requires both hooks for engines without an API
                await self._hook(command)
                if kind == "wake":
                    await self._until_healthy(backend)
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
            log.error("%s of %s failed: %s", kind, backend.name, exc or type(exc).__name__)
            return None
        return time.monotonic() - started

    async def _call(self, backend: Backend, call: AdminCall) -> bytes:
        assert self._session is not None
        headers = dict(getattr(backend.adapter, "headers", {}))
        timeout = aiohttp.ClientTimeout(total=self.config.call_timeout_s)
        async with self._session.request(
            call.method, backend.url + call.path, data=call.body or None, headers=headers, timeout=timeout
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{call.method} {call.path} answered {response.status}: {body[:200]!r}")
            return body

    async def _hook(self, command: list[str]) -> None:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), self.config.call_timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}: {err[-200:]!r}")

    async def _until_healthy(self, backend: Backend) -> None:
        """After a restart hook: the engine is ready once its health check passes."""
        deadline = time.monotonic() + self.config.call_timeout_s
        while not await self.pool.probe(backend) or not backend.probe_healthy:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{backend.name} not healthy after its wake command")
            await asyncio.sleep(0.1)

    async def _read_asleep(self, backend: Backend) -> bool:
        call = backend.adapter.is_sleeping_call()
        if call is None:  # no state route: a hook-driven engine that fails /health is stopped
            return backend.adapter.wake_call() is None and not backend.probe_healthy
        try:
            answer = backend.adapter.parse_is_sleeping(await self._call(backend, call))
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
            log.warning("cannot read whether %s sleeps (%s); taking it as awake", backend.name, exc)
            return False
        return bool(answer)


class SwapCollector:
    """Prometheus: who sleeps, measured swap costs, swaps by outcome (read at scrape time)."""

    def __init__(self, swapper: Swapper) -> None:
        self.swapper = swapper

    def collect(self) -> Iterator:
        swapper = self.swapper
        asleep = GaugeMetricFamily(
            "sloproxy_backend_asleep",
            "1 while model swapping holds the backend (asleep or swapping).",
            labels=["backend"],
        )
        sleep = GaugeMetricFamily(
            "sloproxy_swap_sleep_seconds", "Measured time to put the backend to sleep (EWMA).", labels=["backend"]
        )
        wake = GaugeMetricFamily(
            "sloproxy_swap_wake_seconds", "Measured time to wake the backend (EWMA).", labels=["backend"]
        )
        swaps = CounterMetricFamily("sloproxy_swaps", "Model swaps by outcome.", labels=["outcome"])
        for members in swapper.groups.values():
            for backend in members:
                asleep.add_metric([backend.name], 1.0 if backend.asleep else 0.0)
        for name, seconds in swapper.costs.sleep.items():
            sleep.add_metric([name], seconds)
        for name, seconds in swapper.costs.wake.items():
            wake.add_metric([name], seconds)
        for outcome in ("done", "abandoned", "failed", "declined"):
            swaps.add_metric([outcome], swapper.counts[outcome])
        yield from (asleep, sleep, wake, swaps)
