"""The scheduler: bounded per-model queues, an event-driven dispatch loop, admission budgets.

The policy decides (order, admit, route); the scheduler owns the state and the waiting.
A request handler calls :meth:`Scheduler.acquire` and gets a backend when the policy
dispatches it, or an OpenAI-format error: 429 with ``Retry-After`` when it is shed (queue
full, deadline can no longer be met, queue timeout for sheddable work), 503 when nothing can
serve it. Every acquire is paired with :meth:`release`, which frees the budget and
dispatches again. Dispatch runs on events: arrival, completion, metrics update, and a timer
that also expires hopeless work.

A request whose model has nothing waiting is placed on arrival by the same admission and routing
the queue would apply to it at its head (it would be the head): no future, no queue round trip.
Only a request that must wait joins the queue. ``max_queue`` bounds the requests waiting (the
regions' hold-back queues included: one over the bound is refused queued or held alike), so with
``max_queue: 0`` the proxy dispatches what it can place at once and refuses the rest; shedding of
hopeless work, likewise, applies to requests that would wait (one placed at once is never shed).

``predict_many`` (the full reply-length prediction) runs off the first-chunk path, batched: the
requests that need one are collected and predicted together on the loop's next turn (one pass of
the model for all of them; a lone cold prediction costs several times a batched one). A request that
must wait is predicted before it joins the queue (its order, admission and shedding read it; the
cost hides in the wait): the batch itself admits it to the queue (or refuses it) after the
prediction, and its handler resumes only once, with its backend or the refusal. A request placed on
arrival with its model's prior is predicted once its engine work is under way (:meth:`under_way`);
its KV reservation then follows the prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .backends import Backend, BackendPool
from .drain import DrainRates
from .errors import ProxyError
from .policies.base import Ordering, Policy, Snapshot, Swap
from .request import ProxyRequest, kv_footprint
from .room import RoomIndex
from .scheduler_config import SchedulingConfig
from .state import LocalState, SchedulerState, SharedState

if TYPE_CHECKING:
    from .regions import RegionRouter
    from .state.redis_state import RedisCoordinator
    from .swapping import Swapper

log = logging.getLogger("sloproxy.scheduler")
WAITING_READINGS = 2
URGENT_DEMAND_WEIGHT = 4  # see Scheduler._report_to_fleet
OUTWAIT_CHECK_S = 1.0  # how often waiting sheddable work is re-judged against its queue's drain rate
PARK_LIMIT = 16  # confined heads one dispatch call sets aside to reach the work behind them (Scheduler._park)


def _first_token_bound(request: ProxyRequest) -> bool:
    """Interactive work: a first-token target, and not sheddable (what refuse_overrun and a policy's refusal judge)."""
    slo = request.slo
    return slo is not None and not slo.sheddable and slo.ttft_s is not None


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        pool: BackendPool,
        config: SchedulingConfig | None = None,
        state: SchedulerState | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock  # monotonic seconds; the simulator passes its virtual clock
        self.pool = pool
        self.config = config or SchedulingConfig()
        self.state = state or LocalState()
        # With several replicas, this one dispatches within its share of each budget (state/redis_state.py).
        self.shared: RedisCoordinator | None = state.coordinator if isinstance(state, SharedState) else None
        self.queues: dict[str, Ordering] = {}
        self._waiters: dict[int, asyncio.Future[Backend]] = {}  # id(request) -> dispatch future
        self._queued_bytes = 0
        self._queued = 0  # requests in self.queues: what max_queue bounds, kept here rather than summed per arrival
        self._running: dict[int, ProxyRequest] = {}
        self._timer: asyncio.Task | None = None
        self.counts: Counter[str] = Counter()  # shed / timed out / evicted, by reason
        self.drain = DrainRates(self.config.drain_half_life_s)  # per (model, class) queue: how fast it is served
        self._outwait_checked = 0.0
        self._class_band: dict[str, int] = {}  # SLO class -> band, as its requests joined a queue
        # With several replicas: models whose band-0 work waits at another replica (as of the last
        # sync). This replica holds back its lower bands' work for them (see _place).
        self._urgent_elsewhere: frozenset[str] = frozenset()
        self._preemptions_seen: dict[str, int] = {}  # backend -> the engine's preemption counter last read
        self._waiting_seen: dict[str, int] = {}  # backend -> consecutive readings with work waiting in the engine
        self.predict_many: Callable[[Sequence[ProxyRequest]], None] | None = None  # see the module doc
        # Model swapping (swapping.py): a request whose model's backends all sleep waits for a wake.
        self.swapper: Swapper | None = None
        # Regions (regions.py): set by the proxy when backends span several regions; None costs one check.
        self.regions: RegionRouter | None = None
        # (request, its backend if placed, else the future its acquire awaits): the loop's next turn's batch
        self._to_predict: list[tuple[ProxyRequest, Backend | None, asyncio.Future[Backend] | None]] = []
        self._room = RoomIndex(pool.by_model)  # told of every change to a backend's `mine` or caps
        for backend in pool.backends:
            self._set_budget(backend, self.state.budget(backend.name, self.config.budget_initial))
            backend.mine = backend.in_flight = self.state.in_flight(backend.name)
            self._room.update(backend)
        pool.on_load_update = self._on_load_update
        for backend in pool.backends:
            backend.on_failed = self.evacuate
        if self.shared is not None:
            self.shared.before_sync = self._report_to_fleet
            # Past the first attempt (Proxy.start refreshes after it), shares move only on a successful sync.
            self.shared.after_sync = self.shares_changed

    # ----- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.policy.queued or self.regions is not None:  # held-back work expires on the timer too
            self._timer = asyncio.get_running_loop().create_task(self._tick(), name="scheduler-timer")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        for request_id, waiter in list(self._waiters.items()):
            if not waiter.done():
                waiter.set_exception(ProxyError(503, "The proxy is shutting down.", headers=self._retry_after()))
            self._waiters.pop(request_id, None)
        if self.regions is not None:
            self.regions.fail_all(ProxyError(503, "The proxy is shutting down.", headers=self._retry_after()))

    def _new_queue(self) -> Ordering:
        queue = self.policy.ordering()
        queue.clock = self.clock  # orderings that look at the time see the scheduler's (virtual in simulation)
        return queue

    def replace_policy(self, policy: Policy) -> None:
        """Schedule by ``policy`` from now on (admin reload). Requests waiting move to its queues in
        its order; a policy without a queue routes them at once, as it would have on arrival."""
        waiting = [request for queue in self.queues.values() for request in queue]
        self.policy = policy
        self.queues = {}
        if policy.queued:
            for request in waiting:
                queue = self.queues.get(request.model)
                if queue is None:
                    queue = self.queues[request.model] = self._new_queue()
                queue.push(request)
            if self._timer is None:
                self.start()
            self.dispatch_all()
            return
        if self._timer is not None and self.regions is None:  # held-back work still needs the timer
            self._timer.cancel()
            self._timer = None
        snapshot = self.snapshot()
        for request in waiting:
            self._left_queue(request)
            waiter = self._waiters.get(id(request))
            if waiter is None or waiter.done():
                continue
            candidates = self.candidates(request)
            backend = policy.route(request, candidates, snapshot) if candidates else None
            if backend is None:
                error = ProxyError(503, f"No healthy backend is serving model `{request.model}`.")
                waiter.set_exception(error)
            else:
                waiter.set_result(self._dispatched(request, backend))  # type: ignore[arg-type]

    def replace_regions(self, regions: RegionRouter | None) -> None:
        """Route by ``regions`` from now on (reload: the ``regions:`` section or backends' region or pool
        tags changed; None: one region). No held request is lost: each is handed back to its
        :meth:`acquire`, which pins and holds it again under the new router (or, without one, goes on
        to the queue). Waiting requests take the new router's region order."""
        old = self.regions
        held = old.hand_back() if old is not None else []  # their acquires resume on the loop's next turn
        if regions is not None:
            if old is not None:
                regions.chosen.update(old.chosen)  # a counter in the metrics: it never goes back
            default = old.regions if old is not None else None
            for request in (*held, *self.waiting()):  # the fleet's old order becomes the new one
                request.regions = None if request.regions == default else regions.order(request.regions)
        self.regions = regions
        if regions is not None and self._timer is None:
            self.start()
        if self.policy.queued:
            self.dispatch_all()

    # ----- the request side -----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return Snapshot(self.clock(), self.pool.backends)

    def candidates(self, request: ProxyRequest) -> list[Backend]:
        """The backends ``request`` may go to now: routable, not excluded, in its region (one region
        choice; :meth:`_place` takes these as they are)."""
        if self.regions is not None:
            return self.regions.serving(request, self.pool.by_model.get(request.model, ()))
        return [b for b in self.pool.candidates(request.model) if b.name not in request.excluded]

    async def acquire(self, request: ProxyRequest) -> Backend:
        """Wait until the policy dispatches ``request``; returns its backend (call :meth:`release` after)."""
        if request.model not in self.pool.by_model:
            raise ProxyError(404, f"The model `{request.model}` does not exist.", param="model", code="model_not_found")
        self.pool.fit_by_window(request)  # before it queues: a request no window holds is the client's error
        regions = self.regions
        if regions is not None and regions.holds(request) and regions.pin(request):
            self._check_room(request)  # held work counts against max_queue like queued work
            # Held-back tiers wait per (model, region); tick() expires them. A reload that replaces the
            # router hands them back (False): they are pinned and held again by the new one, if any.
            while not await regions.wait(request):
                regions = self.regions
                if regions is None or not regions.pin(request):
                    break
        candidates = self.candidates(request)
        if not candidates:
            swapper = self.swapper
            if swapper is None or not swapper.wakeable(request.model):
                raise ProxyError(
                    503,
                    f"No healthy backend is serving model `{request.model}` right now.",
                    headers=self._retry_after(),
                )
            swapper.want(request.model)  # its backends sleep: it waits for a swap (the queue timeout bounds it)
            if not self.policy.queued:
                if await swapper.routable(request, self.config.queue_timeout_s):
                    candidates = self.candidates(request)
                if not candidates:
                    raise ProxyError(503, f"No backend of model `{request.model}` woke in time.", code="queue_timeout")
        if not self.policy.queued:
            backend = self.policy.route(request, candidates, self.snapshot())
            assert backend is not None
            return self._dispatched(request, backend)  # type: ignore[arg-type]
        queue = self.queues.get(request.model)
        if not queue:  # nothing waiting for the model: it would be the queue's head, so place it now
            backend = self._place(request, candidates, self.snapshot())
            if backend is not None:
                return self._dispatched(request, backend)
        if self.shared is not None:  # another sync may move share here from idle replicas
            self.shared.request_sync()
        waiter: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        if self.predict_many is not None and request.estimate_source == "prior":
            self._check_room(request)  # refuse before paying for a prediction
            # The batch joins it to the queue once predicted (_predict_batch): this task resumes once,
            # dispatched or refused, instead of once after the prediction and again at dispatch.
            self._predict_soon(request, None, waiter)
        else:
            self._join_queue(request, waiter)
        try:
            backend = await waiter  # a backend is set only once dispatch took the request out of its queue
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(request, waiter.result())  # dispatched, but its caller is gone: free the slot
            queue = self.queues.get(request.model)  # not the one it joined if the policy was replaced since
            if queue is not None and queue.remove(request):  # still waiting (client gone, proxy stopping)
                self._left_queue(request)
            raise
        finally:
            self._waiters.pop(id(request), None)
            # An error set on the future has this frame in its traceback: without this, frame, future
            # and error form a cycle that keeps the request (and its body) until a GC pass.
            del waiter
        return backend

    def _join_queue(self, request: ProxyRequest, waiter: asyncio.Future[Backend]) -> None:
        """Admit ``request`` to its model's queue (or raise the refusal), then dispatch: ``waiter``
        gets its backend when the policy dispatches it, or the error that takes it out of the queue."""
        self._admit_to_queue(request)
        queue = self.queues.get(request.model)
        if queue is None:
            queue = self.queues[request.model] = self._new_queue()
        self._waiters[id(request)] = waiter
        self._queued_bytes += len(request.raw)
        self._queued += 1
        queue.push(request)
        name = self._class_name(request)
        self.state.queue_changed(request.model, name, 1)
        self._class_band[name] = request.band
        self.drain.joined((request.model, name), request.slo and request.slo.deadline_s)
        self.dispatch(request.model)

    def release(self, request: ProxyRequest, backend: Backend, tokens: int | None = None) -> None:
        """The request is done with ``backend`` (finished, failed or abandoned)."""
        if self._running.pop(id(request), None) is None:
            return
        breaker = backend.breaker
        if breaker is not None and breaker.trials:  # a trial nobody reported on (its caller left) frees its slot
            breaker.trial_ended(id(request))
        backend.mine = self.state.release(backend.name, request.id)
        backend.in_flight = backend.mine + backend.remote_in_flight
        self._room.update(backend)
        if self.shared is not None and backend.mine >= backend.cap:
            # The slot freed is beyond this replica's share now: the fleet learns of it at a sync,
            # so ask for one soon rather than at the next interval (slots idled ~1 interval each).
            self.shared.request_sync()
        self._reserve_kv(backend, request, 0)
        used = tokens if tokens is not None else request.est_prompt_tokens
        self.state.add_tenant_tokens(request.tenant, used)
        queue = self.queues.get(request.model)
        if queue is not None:
            queue.served(request, used)
        if self.regions is not None:
            self.regions.completed(backend)
        if self.policy.queued:
            self.dispatch_for(backend)

    def first_token(self, request: ProxyRequest, backend: Backend) -> None:
        """Event: the request's first content reached its client (it can no longer be moved)."""
        request.first_token_at = self.clock()
        if _first_token_bound(request) and request.urgent_deadline is not None:
            self._outcome(request, request.first_token_at <= request.urgent_deadline)
        self.under_way(request, backend)

    def under_way(self, request: ProxyRequest, backend: Backend) -> None:
        """Event: the engine works on ``request`` and its client waits on the engine, not on us. A
        request placed on arrival with its model's prior is predicted now; its reservation follows."""
        if self.predict_many is None or request.estimate_source != "prior" or id(request) not in self._running:
            return
        self._predict_soon(request, backend)

    def _predict_soon(
        self, request: ProxyRequest, backend: Backend | None, waiter: asyncio.Future[Backend] | None = None
    ) -> None:
        """Add ``request`` to the batch predicted on the loop's next turn: placed on ``backend`` (its
        reservation follows the prediction), or waiting to join the queue, which the batch does for it
        (its acquire awaits ``waiter``).

        One future per request, not one per batch: a task awaiting a future that is cancelled (its
        client went away) cancels that future, which with a shared one failed every other request
        of the batch with CancelledError (found in the simulator, which raised on it)."""
        if not self._to_predict:
            asyncio.get_running_loop().call_soon(self._predict_batch)
        self._to_predict.append((request, backend, waiter))

    def _predict_batch(self) -> None:
        batch, self._to_predict = self._to_predict, []
        # A request placed on arrival that has finished since (a stream relayed whole in one read)
        # has no reservation left to correct, and its reply was recorded without a prediction: it
        # is not predicted at all.
        wanted = [request for request, backend, _ in batch if backend is None or id(request) in self._running]
        try:
            assert self.predict_many is not None
            if wanted:
                self.predict_many(wanted)
        except Exception:  # a predictor failure must not fail requests: they keep their priors
            log.exception("length prediction failed for %d requests; they keep their models' priors", len(batch))
        for request, backend, _ in batch:
            if backend is not None and id(request) in self._running:  # placed: its reservation follows
                self._reserve_kv(backend, request, kv_footprint(request))
                tokens = request.est_prompt_tokens + request.est_output_tokens
                self.state.reserve(backend.name, request.id, tokens)
        # Then those that must wait join the queue, in arrival order, as each acquire would have.
        for request, backend, waiter in batch:
            if backend is not None or waiter is None or waiter.done():  # done: cancelled, its client left
                continue
            try:
                self._join_queue(request, waiter)
            except ProxyError as error:  # refused: its acquire raises it (no traceback holding this batch)
                waiter.set_exception(error.with_traceback(None))
            except Exception as error:  # a fault: it fails this request, not the rest of the batch
                log.exception("queueing %s failed", request.id)
                if not waiter.done():
                    waiter.set_exception(error)

    def _check_room(self, request: ProxyRequest) -> None:
        waiting = self._queued
        queued_bytes = self._queued_bytes
        if self.regions is not None:  # the hold-back queues are part of what waits
            waiting += self.regions.held_count
            queued_bytes += self.regions.held_bytes
        if waiting >= self.config.max_queue or queued_bytes + len(request.raw) > self.config.max_queue_bytes:
            self.counts["queue_full"] += 1
            raise ProxyError(
                429, "The proxy queue is full; retry later.", code="queue_full", headers=self._retry_after()
            )

    def _admit_to_queue(self, request: ProxyRequest) -> None:
        self._check_room(request)
        now = self.clock()
        if self.hopeless(request, now) or self.outwaited(request, now):
            self.counts["deadline_exceeded"] += 1
            self._outcome(request, False)
            raise ProxyError(
                429,
                "The request can no longer meet its deadline.",
                code="deadline_exceeded",
                headers=self._retry_after(),
            )
        if self.overrun(request, now):
            self.counts["over_capacity"] += 1
            self._outcome(request, False)
            raise ProxyError(
                429,
                "The fleet is over capacity: this request would not start within its time-to-first-token "
                "target; retry later.",
                code="over_capacity",
                headers=self._retry_after(),
            )
        refusal = self.policy.refusal
        if refusal is not None and _first_token_bound(request) and refusal.refuses(request):
            self.counts["longest_refused"] += 1
            raise ProxyError(
                429,
                "The fleet is over capacity for this model: the requests predicted to run longest are "
                "refused first; retry later.",
                code="over_capacity",
                headers=self._retry_after(),
            )

    # ----- dispatch -------------------------------------------------------------------------------
    def dispatch(self, model: str) -> None:
        """Hand out waiting requests of ``model`` while the policy finds backends that admit them."""
        queue = self.queues.get(model)
        if not queue:
            return
        snapshot: Snapshot | None = None  # taken once something may be placed: most calls find the fleet full
        serving = self.pool.by_model.get(model, ())
        # The healthy backends below their most permissive cap (urgent work's): no request can be placed
        # on another (_place filters by its band's cap, never above urgent_cap), so while there are none
        # the queue is not even looked at. The room index lists them (room.py: the few a release or a
        # budget change opened, not the fleet); within this call only a backend just placed on changes,
        # and it only fills up, so the list is kept by dropping it when it does.
        with_room = self._room.with_room(model)
        parked: list[ProxyRequest] = []  # confined heads set aside for this call (_park)
        held: set[str] = set()  # the backends they may use: nothing behind them is placed there
        try:
            while True:
                if not with_room and any(b.healthy for b in serving):
                    return  # nothing can be placed (see _place): the queue is not even looked at
                request = queue.peek()
                if request is None:
                    return
                if snapshot is None:
                    snapshot = self.snapshot()
                # Without regions, those without room would not pass _place's first filter anyway.
                regional = with_room if self.regions is None else self.regions.serving(request, serving)
                if held:
                    regional = [b for b in regional if b.name not in held]
                backend = self._place(request, regional, snapshot)
                if backend is None:
                    if not any(b.healthy and b.name not in request.excluded for b in serving) and not self._wakeable(
                        model
                    ):
                        self._take(queue, request)
                        self._fail(
                            request,
                            ProxyError(
                                503, f"No healthy backend is serving model `{model}`.", headers=self._retry_after()
                            ),
                        )
                        continue
                    if self._park(request, queue, serving, with_room, parked, held):
                        continue
                    return  # head-of-line: the policy's order is the order of service
                self._place_taken(queue, request, backend, with_room)
        finally:
            for request in parked:
                queue.push(request)

    def _park(
        self,
        request: ProxyRequest,
        queue: Ordering,
        serving: Sequence[Backend],
        with_room: list[Backend],
        parked: list[ProxyRequest],
        held: set[str],
    ) -> bool:
        """Set aside a head that waits for the backends whose windows hold it, while backends with
        smaller windows, which cannot, have room: work behind it may go there, never to the backends
        it may use (``held``), so it loses nothing and those backends do not idle behind it. In policy
        order otherwise: at most ``PARK_LIMIT`` per call, pushed back when the call ends.

        Only confinement by window size counts. Measured (one model, KV-bound A10s with 4,096 windows
        beside an A100 with 8,192, Azure conv at half of least-load's capacity): requests only the A100
        could hold waited for its budget while the A10s ran 0-2 of 8, and the work queued behind them
        missed its SLOs (98.4 -> 99.6% with this). Set aside for any confinement, it also took the heads
        SGLang's length rule leaves to vLLM engines of the same window (whole fits before clamped ones),
        and the SGLang engines, given the work behind them, tripled their TPOT misses (long-prompt conv
        at slo's capacity: 91.9 -> 87.2%; docs/policies.md)."""
        if not request.excluded or len(parked) >= PARK_LIMIT or not queue.restores_removed_head:
            return False
        usable = {b.name for b in serving if b.name not in request.excluded}
        windows = [b.context.total for b in serving if b.name in usable and b.context is not None]
        if len(windows) < len(usable):
            return False  # a window unknown: no telling what confines it
        others = [b for b in with_room if b.name not in usable and b.name not in held]
        smallest = min(windows, default=0)
        if not others or any(b.context is None or b.context.total >= smallest for b in others):
            return False  # no room it leaves to others, or room it is kept from by something else than size
        queue.remove(request)  # not a pop: nothing is charged to it (a fair ordering's deficit), it comes back
        parked.append(request)
        held.update(usable)
        return True

    def _place_taken(self, queue: Ordering, request: ProxyRequest, backend: Backend, with_room: list[Backend]) -> None:
        """``request`` (the head) goes to ``backend``: out of the queue, its waiter told; ``backend`` leaves
        ``with_room`` when that filled it."""
        self._take(queue, request)
        drained = self._left_queue(request)
        waiter = self._waiters.get(id(request))
        if waiter is None or waiter.done():
            return
        self.drain.served(drained)
        waiter.set_result(self._dispatched(request, backend))  # type: ignore[arg-type]
        if backend in with_room and not (backend.mine < backend.urgent_cap and backend.healthy):
            with_room.remove(backend)

    @staticmethod
    def _take(queue: Ordering, request: ProxyRequest) -> None:
        """Pop ``request``, the head ``queue.peek()`` just gave. An ordering whose pop hands back another
        request (its contract is to pop what it peeked) would take that one out of the queue without a
        dispatch, and its client would wait forever: it goes back, and ``request`` leaves by removal."""
        popped = queue.pop()
        if popped is not request:
            log.error("%s popped %s after peeking %s; keeping both", type(queue).__name__, popped.id, request.id)
            queue.push(popped)
            queue.remove(request)

    def _place(self, request: ProxyRequest, serving: Iterable[Backend], snapshot: Snapshot) -> Backend | None:
        """The backend the policy gives ``request`` now among ``serving`` (already narrowed to its region
        by the caller), or None if no backend with room admits it."""
        # A backend at its budget takes nothing (that is what a budget is); with a long queue that
        # is most of the fleet, so only the few with room go through admission and routing.
        if request.band == 0:
            with_room = [b for b in serving if b.mine < b.urgent_cap and b.healthy]
        elif request.model in self._urgent_elsewhere and not self.shared.degraded:  # type: ignore[union-attr]
            # Another replica has urgent work of this model waiting: one queue would serve it first,
            # so this replica leaves what it frees for it (its held-back work is not reported as
            # demand, so the next syncs move the slots there). Not while Redis is unreachable: the
            # last sync's view of the others would hold this work back for the whole outage. With
            # the early re-sync after a share shrinks (redis_state.py), three replicas sharing two
            # engines at a budget of 6 went from 89.1 to 93.0% at x1.4 of the conv trace, speedup 10 (one
            # replica: 97.9%; test_replicas.py's setup).
            assert self.shared is not None
            self.shared.request_sync()
            return None
        else:
            with_room = [b for b in serving if b.mine < b.cap and b.healthy]
        if request.excluded:
            with_room = [b for b in with_room if b.name not in request.excluded]
        if not with_room:
            return None
        policy = self.policy
        admitting = policy.admitting(request, with_room, snapshot)
        if not admitting:
            return None
        return policy.route(request, admitting, snapshot)  # type: ignore[return-value]

    def dispatch_for(self, backend: Backend) -> None:
        for model in backend.models:
            self.dispatch(model)

    def dispatch_all(self) -> None:
        for model in list(self.queues):
            self.dispatch(model)

    def _dispatched(self, request: ProxyRequest, backend: Backend) -> Backend:
        tokens = request.est_prompt_tokens + request.est_output_tokens
        backend.mine = self.state.reserve(backend.name, request.id, tokens)
        backend.in_flight = backend.mine + backend.remote_in_flight
        self._room.update(backend)
        backend.dispatched_since_reading += 1
        name = self._class_name(request)
        self._class_band[name] = request.band
        self.drain.dispatched((request.model, name))
        self._reserve_kv(backend, request, kv_footprint(request))
        self._running[id(request)] = request
        if self.policy.refusal is not None and request.slo is not None and request.slo.sheddable:
            self._outcome(request, True)
        if self.regions is not None:
            config = backend.config
            self.regions.chosen[(request.model, config.region, config.pool or "")] += 1
        breaker = backend.breaker
        if breaker is not None and breaker.half_open:  # one of the trials that decide whether it returns
            breaker.trial_started(id(request))
        return backend

    def _outcome(self, request: ProxyRequest, met: bool) -> None:
        """Tell the policy's refusal (if any) how a request of its model fared: interactive work at its
        first token or refused as an overrun, sheddable work dispatched or shed for its deadline."""
        refusal = self.policy.refusal
        if refusal is not None:
            refusal.outcome(request.model, met)

    @staticmethod
    def _reserve_kv(backend: Backend, request: ProxyRequest, tokens: int) -> None:
        """``request`` now holds ``tokens`` of KV on ``backend`` (0: none): this replica's view and the fleet's."""
        delta = tokens - request.kv_reserved
        backend.kv_mine += delta
        backend.kv_reserved_tokens += delta
        if request.band == 0:
            backend.kv_urgent_tokens += delta
        request.kv_reserved = tokens

    @staticmethod
    def _class_name(request: ProxyRequest) -> str:
        return request.slo.name if request.slo is not None else "none"

    def _left_queue(self, request: ProxyRequest) -> tuple[str, str]:
        """``request`` is out of its queue: the counts follow. Returns its (model, class) drain key."""
        self._queued_bytes -= len(request.raw)
        self._queued -= 1
        name = self._class_name(request)
        self.state.queue_changed(request.model, name, -1)
        key = (request.model, name)
        self.drain.left(key)
        return key

    def _fail(self, request: ProxyRequest, error: ProxyError) -> None:
        """``request`` was taken out of its queue: its waiter gets ``error``."""
        self._left_queue(request)
        waiter = self._waiters.get(id(request))
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _wakeable(self, model: str) -> bool:
        return self.swapper is not None and self.swapper.wakeable(model)

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    # ----- time and metrics -----------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            self.tick()

    def tick(self) -> None:
        """The timer's work: shed and expire, fleet actions, dispatch (the simulator calls it on its own timer)."""
        now = self.clock()
        self.drain.advance(now)
        self.expire(now)
        if self.config.shed_outwaited and now - self._outwait_checked >= OUTWAIT_CHECK_S:
            self._outwait_checked = now
            self.shed_outwaited(now)
        self.fleet_actions()
        self.dispatch_all()

    def evacuate(self, backend: Backend) -> None:
        """``backend`` failed (health checks or the breaker): requests on it that have sent nothing to
        their clients yet go back to the queue for another backend. A hung engine would otherwise hold
        a non-streamed request until ``read_timeout_s`` (300 s by default), since its reply has no
        first byte to time out on. Streams already under way stay: their clients have bytes."""
        for request in list(self._running.values()):
            if request.backend != backend.name or request.first_byte_sent or request.evicted:
                continue
            if request.evict is None:
                continue  # not yet sent upstream: its attempt fails on its own and is retried
            request.evicted = True
            request.evict()
            self.counts["evacuated"] += 1
            log.info("moving %s off failed backend %s", request.id, backend.name)

    def fleet_actions(self) -> None:
        """Run the policy's slow path and carry out what it decides (evictions for now)."""
        fleet = self.policy.fleet
        if fleet is None or not (self._running or any(self.queues.values())):
            return
        running = {r.id: r for r in self._running.values()}
        for action in fleet.actions(self.snapshot(), list(self.waiting()), list(running.values())):
            if isinstance(action, Swap):
                if self.swapper is not None:
                    self.swapper.request(action)
                continue
            victim = running.get(action.request_id)
            if victim is None or victim.first_byte_sent or victim.evict is None or victim.evicted:
                continue  # only work that has sent nothing to its client can move transparently
            victim.evicted = True
            victim.evict()
            self.counts["evicted"] += 1
            log.info("evicting %s: %s", victim.id, action.reason)

    def expire(self, now: float) -> None:
        """Shed sheddable work whose deadline passed; time out anything waiting too long."""
        if self.regions is not None:
            self._expire_held(now)
        for queue in self.queues.values():
            doomed = [(r, error) for r in queue if (error := self._expired(r, now, "queue")) is not None]
            for request, error in doomed:
                queue.remove(request)
                self._fail(request, error)

    def _expire_held(self, now: float) -> None:
        """Held-back work keeps the queue's semantics: a timeout or a lost deadline is an explicit error."""
        assert self.regions is not None
        for _, request, _ in list(self.regions.waiting()):
            error = self._expired(request, now, "hold-back queue")
            if error is not None:
                self.regions.fail(request, error)
        self.regions.release_all()

    def _expired(self, request: ProxyRequest, now: float, queue: str) -> ProxyError | None:
        """The one way a waiting request (queued or held back) times out: the error it gets, counted,
        when it has waited past ``queue_timeout_s`` (429 if sheddable, else 503) or can no longer meet
        its deadline (429); None while it may wait on."""
        timeout = self.config.queue_timeout_s
        if now - request.received_at > timeout:
            self.counts["queue_timeout"] += 1
            return ProxyError(
                429 if request.slo and request.slo.sheddable else 503,
                f"The request waited {timeout:g}s in the {queue} for model `{request.model}`.",
                code="queue_timeout",
                headers=self._retry_after(),
            )
        if self.hopeless(request, now):
            self.counts["deadline_exceeded"] += 1
            self._outcome(request, False)
            return ProxyError(
                429,
                "The request can no longer meet its deadline; shed.",
                code="deadline_exceeded",
                headers=self._retry_after(),
            )
        return None

    def overrun(self, request: ProxyRequest, now: float) -> bool:
        """Work that is not sheddable but has a first-token target, whose on-time queue ahead (at the
        rate its (model, class) queue drains) would outlast that target (``refuse_overrun``)."""
        slo = request.slo
        if not self.config.refuse_overrun or not _first_token_bound(request):
            return False
        queue = self.queues.get(request.model)
        ahead = queue.on_time_ahead(request) if queue is not None else 0
        if not ahead or request.urgent_deadline is None:
            return False
        rate = self.drain.rate((request.model, slo.name))
        if not rate:  # unknown yet, or nothing served lately: no evidence to refuse on
            return False
        return now + (ahead + 1) / rate > request.urgent_deadline

    def shed_outwaited(self, now: float) -> None:
        """Shed queued sheddable work that, at the rate its model leaves to its class, would wait past
        its deadline.

        :meth:`outwaited` judges arrivals; this judges those already waiting, in deadline order (the
        k-th still kept waits behind k of its class and the classes ahead). It catches what joined
        before the rate was known: at 5x overload, batch that arrived in the first seconds otherwise
        got its 429 after 55 s of a 60 s deadline (bench/overload.py). Runs every ``OUTWAIT_CHECK_S``
        from the timer."""
        shed_tpot = self.config.shed_tpot_s
        for model, queue in self.queues.items():
            by_class: dict[str, list[ProxyRequest]] = {}
            for request in queue:
                slo = request.slo
                if slo is not None and slo.sheddable and request.deadline is not None:
                    by_class.setdefault(slo.name, []).append(request)
            for name, waiting in by_class.items():
                outlook = self.drain.behind((model, name), self._classes_ahead(name))
                if outlook is None:
                    continue
                waiting_ahead, spare = outlook
                waiting.sort(key=lambda r: r.deadline)  # type: ignore[arg-type,return-value]
                kept = 0
                for request in waiting:
                    wait = (waiting_ahead + kept + 1) / spare if spare > 0 else math.inf
                    if now + wait + request.est_output_tokens * shed_tpot < request.deadline:  # type: ignore[operator]
                        kept += 1
                        continue
                    queue.remove(request)
                    self.counts["deadline_exceeded"] += 1
                    self._outcome(request, False)
                    self._fail(
                        request,
                        ProxyError(
                            429,
                            "The queue ahead would outlast the request's deadline; shed.",
                            code="deadline_exceeded",
                            headers=self._retry_after(),
                        ),
                    )

    def _classes_ahead(self, name: str) -> list[str]:
        """The classes of more important bands than ``name``'s: their waiters go first, and what they
        take of the model is not left to it (``DrainRates.wait_behind_s``)."""
        band = self._class_band.get(name, 1)
        return [other for other, b in self._class_band.items() if b < band]

    def hopeless(self, request: ProxyRequest, now: float) -> bool:
        """Sheddable work that can no longer finish by its deadline, even if dispatched now:
        its estimated reply at ``shed_tpot_s`` per token would end past the deadline."""
        slo = request.slo
        if not (slo and slo.sheddable and request.deadline is not None):
            return False
        return now + request.est_output_tokens * self.config.shed_tpot_s >= request.deadline

    def outwaited(self, request: ProxyRequest, now: float) -> bool:
        """Sheddable work that would wait out its deadline in the queue: the requests of its model and
        class already waiting, served at the rate that queue has drained (``drain.py``), end past it.
        Refused at arrival with 429 + Retry-After, instead of waiting until :meth:`hopeless` sheds it
        near its deadline (5x overload, measured: 52 s of a 60 s deadline spent in the queue for a 429)."""
        slo = request.slo
        if not (self.config.shed_outwaited and slo and slo.sheddable and request.deadline is not None):
            return False
        waiting = self.drain.waiting[(request.model, slo.name)]
        wait = (
            self.drain.wait_behind_s((request.model, slo.name), waiting, self._classes_ahead(slo.name))
            if waiting > 0
            else 0.0
        )
        return wait is not None and now + wait + request.est_output_tokens * self.config.shed_tpot_s >= request.deadline

    def _on_load_update(self, backend: Backend) -> None:
        """Adapt the backend's budget to what the engine reports, then dispatch.

        The budget aims at what the engine can run without queueing. Work waiting inside the engine,
        or a preemption since the last reading, means it is past its capacity right now: the budget
        drops to the number it runs. The ceiling remembers that capacity but falls by at most one per
        drop: while the engine keeps up and the budget is what limits dispatch, the budget grows back
        to the ceiling, and after a quiet spell there probes one above it. A backend that reports no
        KV usage doubles its budget until the first drop (slow start). On a KV-bound engine
        capacity in requests moves with prompt and reply lengths; a ceiling set outright by the
        latest drop held A10 budgets at 2-3 after one reading with long prompts (measured: edf lost
        a fifth of its capacity to least-load). A full KV cache with nothing
        waiting is an engine fully used, not overloaded, so KV usage alone never shrinks the budget.
        """
        load = backend.load
        config = self.config
        if load is not None:
            budget = backend.budget
            preempted = False
            if load.preemptions is not None:
                seen = self._preemptions_seen.get(backend.name, load.preemptions)
                preempted = load.preemptions > seen
                self._preemptions_seen[backend.name] = load.preemptions
            # One reading with work waiting is often just a prefill the engine has not reached yet
            # (chunked prefill admits a few thousand tokens per step): only waiting seen twice in a
            # row, or with the KV cache nearly full, or a preemption says the engine is over capacity.
            # With several replicas, requests dispatched since the previous reading may be waiting
            # for their first prefill chunk, and shares granted at syncs send them in bursts: only
            # waiting beyond them (the others' estimated in proportion to the fleet's in-flight
            # count) has waited a whole interval. Without it three replicas on Redis held an A100 at
            # 14-22 requests where one replica ran 90 (bench/replicas.py). One replica does without:
            # on the bursty code trace it cost `slo` a scale step (bench/policy_capacity.py).
            fresh = 0
            if self.shared is not None:
                fresh = backend.dispatched_since_reading
                if backend.mine > 0 and backend.in_flight > backend.mine:
                    fresh = fresh * backend.in_flight // backend.mine
            backend.dispatched_since_reading = 0
            waited = self._waiting_seen[backend.name] = (
                self._waiting_seen.get(backend.name, 0) + 1 if load.waiting > fresh else 0
            )
            kv_full = load.kv_usage is not None and load.kv_usage > 0.9
            if (waited >= WAITING_READINGS or (waited and kv_full)) or preempted:
                budget = max(config.budget_min, min(budget, load.running))
                backend.ceiling = max(budget, (backend.ceiling or budget) - 1)
                backend.quiet_updates = 0
                backend.probe_step = 1
            elif load.waiting == 0 and backend.in_flight >= 0.7 * budget:  # the budget, not the engine, limits
                backend.quiet_updates += 1
                ceiling = backend.ceiling or config.budget_max
                if backend.ceiling is None and load.kv_usage is None:
                    # Slow start (TCP's): an engine that reports no KV usage (no metrics, or an
                    # OpenAI-compatible API) shows its capacity only by queueing, so a gentle climb
                    # towards it only throttles: the budget doubles until work waits. At +1/8 per
                    # reading a fresh proxy held 64 clients of such a backend in its queue for
                    # 15-60 s (bench/proxy_overhead.py, budget 8 -> 37). Engines that report KV
                    # climb by an eighth: doubling while KV stayed under half full cost slo, edf
                    # and seallm a capacity step on the bursty code trace (0.75 -> 0.625,
                    # bench/policy_capacity.py): bursts of long prompts reached the engines' own
                    # FCFS queues before any reading showed them waiting.
                    budget = min(ceiling, budget * 2)
                elif budget < ceiling:
                    budget = min(ceiling, budget + max(1, budget // 8))
                elif backend.quiet_updates >= config.probe_after_updates:
                    # A probe the engine kept up with doubles the next one: an engine far below its
                    # capacity (an A100 at 8% KV, its ceiling set by one early drop) gets there in a
                    # few probes instead of one request per probe; a failed probe starts again at one.
                    backend.ceiling = budget = min(config.budget_max, budget + backend.probe_step)
                    backend.probe_step *= 2
                    backend.quiet_updates = 0
            if budget != backend.budget:
                self._set_budget(backend, budget)
        elif (
            not backend.load_reported
            and backend.ceiling is None
            and backend.in_flight >= 0.7 * backend.budget
            and backend.budget < config.budget_max
        ):
            # The engine answers /metrics without its load figures (vLLM --disable-log-stats): routing
            # treats its load as unknown, never as zero. Its capacity then shows only by failing, as
            # for an engine that reports no KV: the budget doubles while it is what limits dispatch.
            self._set_budget(backend, min(config.budget_max, backend.budget * 2))
        if self.regions is not None:
            self.regions.completed(backend)
        if self.policy.queued:
            self.dispatch_for(backend)

    def _set_budget(self, backend: Backend, budget: int) -> None:
        backend.budget = budget
        backend.urgent_budget = budget + max(1, budget // 4) if backend.priority_scheduling else budget
        self.state.set_budget(backend.name, budget)
        self._set_caps(backend)

    def _set_caps(self, backend: Backend) -> None:
        """What this replica may hold on ``backend``: its budget, or with several replicas its share
        of it (urgent work's margin over the budget split in the same proportion)."""
        shared = self.shared
        if shared is None:
            backend.cap, backend.urgent_cap = backend.budget, backend.urgent_budget
        else:
            cap = max(0, min(backend.budget, shared.share(backend.name)))
            margin = backend.urgent_budget - backend.budget
            backend.cap = cap
            backend.urgent_cap = cap + (margin * cap // backend.budget if backend.budget > 0 else 0)
        self._room.update(backend)

    # ----- several replicas ---------------------------------------------------------------------------
    def _report_to_fleet(self) -> None:
        """Before a state sync: this replica's load, and its demand per backend: in flight + waiting,
        band-0 waiting counted ``URGENT_DEMAND_WEIGHT`` times, so shares move towards the replicas
        holding urgent work, as one queue would serve it first; work held back for another replica's
        urgent work (see :meth:`_place`) is not counted."""
        assert self.shared is not None
        waiting: Counter[str] = Counter()
        held_back = self._urgent_elsewhere
        for (model, name), count in self.drain.waiting.items():
            if count > 0:
                if self._class_band.get(name, 1) == 0:
                    waiting[model] += URGENT_DEMAND_WEIGHT * count
                elif model not in held_back:
                    waiting[model] += count
        for b in self.pool.backends:
            demand = b.mine + sum(waiting[model] for model in b.models)
            self.shared.update_local(b.name, b.mine, b.kv_mine, demand)

    def shares_changed(self) -> None:
        """After a state sync: the fleet's load as the policies see it, this replica's caps; dispatch."""
        shared = self.shared
        if shared is None:
            return
        bands = self._class_band
        self._urgent_elsewhere = frozenset(
            model for (model, name), n in shared.remote_queue_depths().items() if n > 0 and bands.get(name, 1) == 0
        )
        for b in self.pool.backends:
            b.remote_in_flight = shared.remote_in_flight(b.name)
            b.remote_kv_tokens = shared.remote_kv_tokens(b.name)
            b.in_flight = b.mine + b.remote_in_flight
            b.kv_reserved_tokens = b.kv_mine + b.remote_kv_tokens
            self._set_caps(b)
        if self.policy.queued:
            self.dispatch_all()

    def waiting(self) -> Iterable[ProxyRequest]:
        for queue in self.queues.values():
            yield from queue
