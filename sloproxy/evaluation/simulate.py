"""Trace-driven discrete-event simulation: the live proxy's scheduler and policy in front of emulated engines.

What runs is the live code: the :class:`~sloproxy.scheduler.Scheduler` with the policy loaded by name,
:class:`~sloproxy.backends.Backend` objects built from a proxy config, requests parsed by
:func:`~sloproxy.request.parse_request` and classified by :class:`~sloproxy.slo.Classifier`, and each
fleet instance's :class:`~sloproxy.emulator.engine.Engine`. Only the clock is virtual (one event heap)
and HTTP is replaced by direct calls that keep the live order of events:

* arrival -> parse, :func:`estimate`, classify -> ``scheduler.acquire`` (the coroutine itself) ->
  the instance accepts or refuses as the emulator's HTTP layer does (context length, TGI's
  concurrency limit -> 429, a full queue -> 503; 429/5xx are retried once elsewhere, as the
  forwarder does) -> engine -> first token -> finish -> ``scheduler.release(request, backend, tokens)``;
* the proxy's first byte (``first_token``, the end of evictability) comes with the first token on every
  engine: vLLM and SGLang send their chat role chunk with their first engine output, not on acceptance;
* load: every ``load_polling.interval_s`` each backend gets the reading its adapter would parse from
  the engine's ``/metrics`` at that instant (:func:`engine_load`), then the scheduler's update hook;
* the scheduler's timer (``tick``) every ``scheduling.tick_s``; the client gives up (status
  ``timeout``, engine abort) after ``timeout_s`` as the replayer does.

Network and proxy overhead (~0.3 ms per request live) is not modelled. Times are trace seconds.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from ..adapters.base import BackendLoad
from ..backends import Backend, BackendPool
from ..config import BackendConfig, ProxyConfig
from ..context import ContextWindow
from ..emulator import sglang_api, tgi_api, vllm_api
from ..emulator.engine import Engine
from ..emulator.engine import Sequence as EngineSequence
from ..emulator.fleet import FleetSpec, InstanceSpec
from ..emulator.profiles import get_profile
from ..emulator.versions import parse_version, version_string
from ..errors import ProxyError
from ..estimates import LengthEstimates
from ..plugins import load_policy
from ..request import ProxyRequest, parse_request
from ..scheduler import Scheduler
from ..slo import Classifier, tenant_named
from .records import RequestRecord, RunMeta, fleet_record, tpot
from .simloop import Task, VirtualLoop
from .simprep import SimRequest

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})  # what the forwarder retries before the first byte
SHED_STATUSES = frozenset({429, 503})  # what the replayer records as "rejected"
_ARRIVAL, _STEP, _POLL, _TICK, _TIMEOUT = range(5)


LENGTHS = ("predicted", "median", "oracle")
"""What a simulated proxy knows of reply lengths: the predictor (as live), only each model's median (the
predictor's prior, never refined from the prompt), or the true lengths."""


def estimate(request: ProxyRequest, item: SimRequest, lengths: str, estimates: LengthEstimates) -> None:
    """Set the request's arrival estimate as the live proxy does (``LengthEstimates.prior``; the
    scheduler runs ``predict_many`` later), or the true length for the oracle.
    Runs before classification, which derives deadlines from it."""
    if lengths == "oracle":
        request.est_output_tokens = item.output_tokens
        request.pred_p50 = request.pred_p90 = float(item.output_tokens)
        request.estimate_source = "oracle"
    else:
        estimates.prior(request)


def engine_load(engine: Engine) -> BackendLoad:
    """What the engine's adapter parses from its ``/metrics`` right now (same numbers, no text)."""
    kv = engine.kv
    running, waiting = len(engine.running), len(engine.waiting)
    capacity = kv.num_blocks * kv.block_size
    if engine.kind == "vllm":
        return BackendLoad(
            running=running,
            waiting=waiting,
            kv_usage=kv.usage,
            kv_capacity_tokens=capacity,
            preemptions=engine.stats.preemptions,
            generation_tokens=engine.stats.generation_tokens,
        )
    if engine.kind == "sglang":
        used = float(kv.used * kv.block_size)
        usage = kv.usage
        return BackendLoad(
            running=running,
            waiting=waiting,
            kv_usage=usage,
            kv_capacity_tokens=int(used / usage) if used and usage else None,
            generation_tokens=engine.stats.generation_tokens,
        )
    held = sum(seq.computed for seq in engine.running)
    return BackendLoad(running=running, waiting=waiting, kv_usage=held / float(capacity), kv_capacity_tokens=capacity)


def proxy_config(fleet: FleetSpec, policy: str, params: dict[str, Any] | None = None, base: ProxyConfig | None = None):
    """The proxy config a live deployment in front of ``fleet`` would have: one backend per instance
    (engine kind, model, priority hints where the instance schedules by priority), the rest from ``base``."""
    backends = [
        BackendConfig(
            name=spec.name,
            engine=spec.engine,
            # nothing connects in the simulator: an address only where the fleet file gives one
            url=f"http://{spec.host or fleet.host}:{spec.port}"
            if spec.port is not None
            else f"http://{spec.name}.invalid",
            models=[spec.model],
            priority_scheduling=spec.scheduling_policy == "priority",
        )
        for spec in fleet.instances
    ]
    base = base or ProxyConfig(backends=backends)
    chosen = msgspec.structs.replace(base.policy, name=policy, params=dict(params or base.policy.params))
    return msgspec.structs.replace(base, backends=backends, policy=chosen)


class _Retryable(Exception):
    """A failure before the first byte that the forwarder retries on another backend."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class _Instance:
    """One emulated engine instance and what its HTTP layer checks before submitting."""

    spec: InstanceSpec
    engine: Engine
    max_model_len: int
    version: tuple[int, ...] = ()  # the engine release it behaves as (emulator/versions.py)
    step_token: int = -1  # the order number of the step event that is current (older ones are stale)

    @classmethod
    def build(cls, spec: InstanceSpec) -> _Instance:
        profile = get_profile(spec.profile)
        engine = Engine(
            spec.engine,
            profile,
            priority_scheduling=spec.scheduling_policy == "priority",
            max_num_seqs=spec.max_num_seqs,
            prefix_caching=spec.prefix_caching,
        )
        limit = min(spec.max_model_len or profile.model.max_position, profile.kv_capacity_tokens)
        return cls(spec, engine, limit, parse_version(version_string(spec.engine, spec.engine_version)))

    @property
    def window(self) -> ContextWindow:
        """The window the engine reports (what its adapter parses at start): TGI's /info says a prompt
        may be one token shorter, SGLang's scheduler refuses one within six tokens of it."""
        limit = self.max_model_len
        if self.spec.engine == "tgi":
            return ContextWindow(limit, limit - 1)
        if self.spec.engine == "sglang":
            return ContextWindow(limit, limit - 6)
        return ContextWindow(limit)

    def admit(self, prompt: int, requested: int | None) -> int:
        """The emulator's checks for a chat request, in each engine's order (``emulator/*_api.py``
        ``_admit``): the most tokens the reply may have, or the :class:`ProxyError` the engine's answer
        becomes through its adapter (TGI's in-stream events included)."""
        spec, engine, window = self.spec, self.engine, self.max_model_len
        limit = spec.max_queued_requests
        if spec.engine == "vllm":
            if limit is not None and engine.num_in_flight + 1 > limit:  # running + waiting
                return _refuse(503, vllm_api.QUEUE_FULL)
            if requested is not None and requested > window:
                return _refuse(400, f"max_tokens={requested} cannot be greater than max_model_len={window}.")
            if prompt > window:
                return _refuse(
                    400,
                    f"This model's maximum context length is {window} tokens. However, your prompt contains "
                    f"at least {window + 1} input tokens, which exceeds this limit even without any output tokens.",
                )
            max_new = window - prompt if requested is None else min(window - prompt, requested)
            return max_new if max_new >= 1 else _refuse(400, f"max_tokens must be at least 1, got {max_new}.")
        if spec.engine == "sglang":
            refusal = sglang_api.context_refusal(window, prompt, requested)
            if refusal is not None:
                return _refuse(400, refusal)
            max_req_len, max_input = sglang_api.request_limits(window, engine.kv.num_blocks * engine.kv.block_size)
            if prompt >= max_input:
                return _refuse(
                    400, f"Input length ({prompt} tokens) exceeds the maximum allowed length ({max_input} tokens)."
                )
            if limit is not None and len(engine.waiting) + 1 > limit:
                return _refuse(503, sglang_api.QUEUE_FULL)
            return sglang_api.clamp_max_new_tokens(max_req_len, prompt, requested)
        if engine.num_in_flight >= spec.max_concurrent_requests:  # TGI: the permit comes before validation
            return _refuse(429, tgi_api.OVERLOADED)
        try:
            return tgi_api.output_limit(window, prompt, requested, self.version)
        except tgi_api.Refused as refused:
            return _refuse(400, refused.message)


def _refuse(status: int, message: str) -> int:
    raise ProxyError(status, message)


@dataclass(slots=True, eq=False)
class _Client:
    """One workload request from arrival to its record."""

    item: SimRequest
    request: ProxyRequest | None = None
    task: Task | None = None
    dispatched_at: list[float] = field(default_factory=list)
    first_at: float | None = None
    finish_at: float | None = None
    seq: EngineSequence | None = None
    record: RequestRecord | None = None


@dataclass(slots=True, eq=False)
class _Attempt:
    """One engine call: resolves when the reply ends, fails with _Retryable when evicted."""

    client: _Client
    instance: _Instance
    seq: EngineSequence
    future: Any


class Simulation:
    """One run: a fleet, a policy, a prepared workload. :meth:`run` returns one record per request."""

    def __init__(
        self,
        fleet: FleetSpec,
        requests: Sequence[SimRequest],
        config: ProxyConfig,
        *,
        lengths: str = "predicted",
        timeout_s: float = 600.0,
        scale: float = 1.0,
        poll_phase_s: float = 0.0,
        overhead_s: float = 0.0,
        check_invariants: bool = False,
    ) -> None:
        if lengths not in LENGTHS:
            raise ValueError(f"lengths: one of {', '.join(LENGTHS)}, got {lengths!r}")
        if scale <= 0:
            raise ValueError("the rate scale must be positive")
        if timeout_s <= 0:
            raise ValueError("the client timeout must be positive")
        if not 0 <= poll_phase_s < config.load_polling.interval_s:
            raise ValueError("the load-polling phase must be within [0, load_polling.interval_s)")
        if overhead_s < 0:
            raise ValueError("the overhead must not be negative")
        self.fleet = fleet
        self.requests = requests
        self.config = config
        self.lengths = lengths
        self.timeout_s = timeout_s
        self.scale = scale
        self.poll_phase_s = poll_phase_s  # where the proxy's polling cycle stands when the trace starts
        self.overhead_s = overhead_s  # fixed client-seen latency of the HTTP path (see simulate())
        self.check_invariants = check_invariants
        self.now = 0.0
        self.loop = VirtualLoop(self.clock)
        self.instances = {spec.name: _Instance.build(spec) for spec in fleet.instances}
        self.pool = BackendPool(
            config.backends, config.health, config.load_polling, clock=self.clock, context=config.context
        )
        self.policy = load_policy(config.policy.name, config.policy.params)
        # The same estimates as live (no online learning: a run must not change its own predictor).
        uses = self.policy.uses_predictions
        oracle = lengths == "oracle"
        self.estimates = LengthEstimates(None) if oracle else LengthEstimates.from_config(config.predictor, uses)
        self.scheduler = Scheduler(self.policy, self.pool, config.scheduling, clock=self.clock)
        if self.estimates.enabled and lengths == "predicted":  # "median": the prior stays the estimate
            self.scheduler.predict_many = self.estimates.predict_many  # as live: off the first-chunk path
        self._backends = {b.name: b for b in self.pool.backends}
        for backend in self.pool.backends:  # as live, where each engine reports its window at start
            self.pool.set_context(backend, self.instances[backend.name].window)
        self.classifier = Classifier(config.slo_classes, config.default_class, config.tenants, config.models)
        self.clients = [_Client(item) for item in requests]
        self.retries = config.limits.retries_before_first_byte
        self._heap: list[tuple[float, int, int, Any]] = []
        self._order = itertools.count()
        self._attempts: dict[int, _Attempt] = {}  # id(engine sequence) -> its attempt
        self._touched: list[_Instance] = []
        self._outstanding = 0  # clients without a record yet
        self._next_poll = 0.0
        self.events = 0
        self.wall_s = 0.0

    def clock(self) -> float:
        return self.now

    # ----- the event heap ---------------------------------------------------------------------------
    def _push(self, at: float, kind: int, payload: Any) -> int:
        order = next(self._order)
        heapq.heappush(self._heap, (at, order, kind, payload))
        return order

    def run(self) -> list[RequestRecord]:
        started = time.perf_counter()
        self._push(self.poll_phase_s, _POLL, None)
        if self.poll_phase_s > 0:  # the proxy started before the first request: it has a reading
            self._poll_at_start()
        for client in self.clients:
            self._push(client.item.arrival_s / self.scale, _ARRIVAL, client)
        self._outstanding = len(self.clients)
        if self.policy.queued:
            self._push(self.config.scheduling.tick_s, _TICK, None)
        heap, loop = self._heap, self.loop
        with loop.running():
            while heap and self._outstanding:
                at, order, kind, payload = heapq.heappop(heap)
                self.now = at
                self.events += 1
                if kind == _STEP:
                    if payload.step_token != order:
                        continue  # superseded: the run was cut
                    self._step_done(payload)
                elif kind == _ARRIVAL:
                    self._arrive(payload)
                elif kind == _POLL:
                    self._poll()
                elif kind == _TICK:
                    self.scheduler.tick()
                    self._push(at + self.config.scheduling.tick_s, _TICK, None)
                else:
                    self._timeout(payload)
                loop.run_ready()
                if self._touched:
                    self._plan_touched()
        if self._outstanding:
            raise RuntimeError(f"the simulation stalled with {self._outstanding} requests unfinished")
        self.wall_s = time.perf_counter() - started
        return [client.record for client in self.clients]  # type: ignore[misc]

    # ----- engines ----------------------------------------------------------------------------------
    def _plan(self, instance: _Instance, now: float) -> None:
        step = instance.engine.plan_run(now, self._next_poll)
        if step is not None:
            instance.step_token = self._push(step.end, _STEP, instance)

    def _plan_touched(self) -> None:
        for instance in self._touched:
            if instance.engine.current is None:
                self._plan(instance, self.now)
        self._touched.clear()

    def _cut(self, instance: _Instance) -> None:
        """The engine is looked at or changed now: a decode run in flight stops at the iteration in flight."""
        engine = instance.engine
        current = engine.current
        if current is not None and current.ends is not None and self.now < current.end:
            step = engine.cut_run(self.now)
            assert step is not None
            instance.step_token = self._push(step.end, _STEP, instance)

    def _touch(self, instance: _Instance) -> None:
        """The engine's work changes now (submit, abort): cut any run, plan again once the instant is over."""
        self._cut(instance)
        self._touched.append(instance)

    def _step_done(self, instance: _Instance) -> None:
        engine = instance.engine
        progressed = engine.complete_step()
        if self.check_invariants:
            self._check_engine(engine)
        self._plan(instance, self.now)  # back to back, before the proxy hears of it (as the real-time driver)
        attempts = self._attempts
        for seq in progressed:
            attempt = attempts.get(id(seq))
            if attempt is None:
                continue
            client = attempt.client
            if client.first_at is None:
                client.first_at = self.now
                self._first_byte(client.request, attempt.instance)  # type: ignore[arg-type]
            if seq.finished:
                del attempts[id(seq)]
                request = client.request
                assert request is not None
                request.prompt_tokens, request.completion_tokens = seq.prompt_len, seq.output  # the usage chunk
                client.finish_at = self.now
                attempt.future.set_result(None)

    def _first_byte(self, request: ProxyRequest, instance: _Instance) -> None:
        request.first_byte_sent = True
        self.scheduler.first_token(request, self._backends[instance.spec.name])

    def _check_engine(self, engine: Engine) -> None:
        kv = engine.kv
        if not 0 <= kv.free <= kv.num_blocks:
            raise AssertionError(f"KV blocks out of range: {kv.free} free of {kv.num_blocks}")
        if len(engine.running) > engine.max_num_seqs:
            raise AssertionError(f"{len(engine.running)} running > max_num_seqs {engine.max_num_seqs}")

    def _abort(self, attempt: _Attempt) -> None:
        self._attempts.pop(id(attempt.seq), None)
        self._touch(attempt.instance)
        attempt.instance.engine.abort(attempt.seq, self.now)

    # ----- load polling -------------------------------------------------------------------------------
    def _poll(self) -> None:
        now = self.now
        self._next_poll = now + self.config.load_polling.interval_s
        on_update = self.pool.on_load_update
        for backend in self.pool.backends:
            instance = self.instances[backend.name]
            self._cut(instance)
            backend.load = engine_load(instance.engine)
            backend.load_read_at = now
            if on_update is not None:
                on_update(backend)
        self._push(self._next_poll, _POLL, None)

    def _poll_at_start(self) -> None:
        """The reading the proxy took before the trace started (an idle fleet)."""
        for backend in self.pool.backends:
            backend.load = engine_load(self.instances[backend.name].engine)
            backend.load_read_at = self.poll_phase_s - self.config.load_polling.interval_s
            if self.pool.on_load_update is not None:
                self.pool.on_load_update(backend)

    # ----- clients ------------------------------------------------------------------------------------
    def _arrive(self, client: _Client) -> None:
        item = client.item
        now = self.now
        try:
            request = parse_request("chat", item.raw)
            request.received_at = now
            estimate(request, item, self.lengths, self.estimates)
            headers = {"x-slo-class": item.slo_class}
            if item.tenant is not None:
                headers["x-tenant"] = item.tenant
            tenant = tenant_named(self.classifier.tenants, headers)
            request.classify(*self.classifier.classify(tenant, headers, request.model), tenant and tenant.band)
        except ProxyError as error:
            self._record(client, error)
            return
        client.request = request
        self._push(now + self.timeout_s, _TIMEOUT, client)
        client.task = Task(self._forward(client), lambda task: self._handled(client, task))

    def _handled(self, client: _Client, task: Task) -> None:
        if client.record is not None:
            return
        error = task.error
        if error is None:
            self._record(client, None)
        elif isinstance(error, ProxyError):
            self._record(client, error)
        else:
            raise error

    def _timeout(self, client: _Client) -> None:
        if client.record is not None or client.task is None:
            return
        self._record(client, None, timed_out=True)  # the client gave up; its handler is cancelled
        client.task.cancel()

    async def _forward(self, client: _Client) -> None:
        """:meth:`sloproxy.forward.Forwarder.forward`'s control flow, with the engine call simulated."""
        request = client.request
        assert request is not None
        scheduler = self.scheduler
        last_error: ProxyError | None = None
        failures = 0
        while failures <= self.retries:
            if last_error is not None and not scheduler.candidates(request):
                break
            backend = await scheduler.acquire(request)
            client.dispatched_at.append(self.now)
            request.backend = backend.name
            request.attempts += 1
            try:
                await self._attempt(client, backend)
                return
            except _Retryable as failure:
                if request.evicted:  # the scheduler moved it: back to the queue, not a failure
                    request.evicted = False
                    continue
                failures += 1
                last_error = failure.error
                request.excluded.add(backend.name)
            except ProxyError as error:
                if not request.first_byte_sent and self.pool.reroute_after_refusal(request, backend, error):
                    continue  # to a backend whose window holds it, as the forwarder does
                raise
            finally:
                request.evict = None
                scheduler.release(request, backend, request.tokens_used)
        raise last_error or ProxyError(503, f"No backend could serve model `{request.model}`.")

    async def _attempt(self, client: _Client, backend: Backend) -> None:
        instance = self.instances[backend.name]
        request = client.request
        assert request is not None
        request.clamped_to = request.clamps.get(backend.name) if request.clamps is not None else None
        item = client.item
        requested = request.clamped_to if request.clamped_to is not None else item.max_tokens
        try:
            max_new = instance.admit(item.prompt_tokens, requested)
        except ProxyError as refusal:
            if refusal.status in RETRYABLE_STATUSES:
                raise _Retryable(refusal) from None
            raise
        seq = self._submit(client, instance, backend, max_new)
        attempt = _Attempt(client, instance, seq, self.loop.create_future())
        self._attempts[id(seq)] = attempt

        def evict() -> None:  # the upstream connection closes: the engine aborts, the attempt fails
            self._abort(attempt)
            if not attempt.future.done():
                attempt.future.set_exception(_Retryable(ProxyError(503, "evicted")))

        request.evict = evict
        try:
            await attempt.future
        except BaseException:
            if id(seq) in self._attempts:  # the client went away mid-reply: abort in the engine
                self._abort(attempt)
            raise

    def _submit(self, client: _Client, instance: _Instance, backend: Backend, max_new: int) -> EngineSequence:
        item, request = client.item, client.request
        assert request is not None
        engine = instance.engine
        prompt = item.prompt_tokens
        natural = max(item.output_tokens, 1)  # the emulator's lengths table holds the workload's lengths
        target, hit_limit = (max_new, True) if natural >= max_new else (natural, False)
        engine_priority = getattr(backend.adapter, "engine_priority", None)
        priority = engine_priority(request) if engine_priority is not None else None
        seq = EngineSequence(
            rid=f"{request.id}-{request.attempts}",
            prompt_len=prompt,
            block_hashes=item.hashes[engine.kv.block_size],
            target_tokens=target,
            hit_limit=hit_limit,
            max_new_tokens=max_new,
            priority=priority or 0,
            arrival=self.now,
        )
        client.seq = seq
        self._touch(instance)
        engine.stats.requests_received += 1
        engine.add(seq)
        return seq

    def _record(self, client: _Client, error: ProxyError | None, *, timed_out: bool = False) -> None:
        item = client.item
        arrival = item.arrival_s / self.scale
        seq = client.seq
        if timed_out:
            status, http_status, message = "timeout", None, f"no complete reply within {self.timeout_s:g} s"
        elif error is not None:
            status = "rejected" if error.status in SHED_STATUSES else "error"
            http_status, message = error.status, error.message
        else:
            status, http_status, message = "ok", 200, None
        ok = status == "ok"
        extra = self.overhead_s
        ttft = client.first_at - arrival + extra if ok and client.first_at is not None else None
        e2e = client.finish_at - arrival + extra if ok and client.finish_at is not None else None
        output = seq.output if seq is not None and (ok or seq.output) else None
        client.record = RequestRecord(
            id=item.id,
            model=item.model,
            slo_class=item.slo_class,
            arrival_s=arrival,
            status=status,
            http_status=http_status,
            error=message,
            ttft_s=ttft,
            tpot_s=tpot(e2e, ttft, output) if ok else None,
            e2e_s=e2e,
            prompt_tokens=seq.prompt_len if seq is not None and ok else None,
            output_tokens=output,
            expected_output_tokens=item.output_tokens,
        )
        self._outstanding -= 1

    # ----- summary --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        engines = [i.engine for i in self.instances.values()]
        return {
            "events": self.events,
            "engine_steps": sum(e.stats.steps for e in engines),
            "preemptions": sum(e.stats.preemptions for e in engines),
            "scheduler": dict(self.scheduler.counts),
            "wall_s": round(self.wall_s, 3),
        }


def simulate(
    fleet: FleetSpec,
    requests: Sequence[SimRequest],
    policy: str,
    *,
    params: dict[str, Any] | None = None,
    base: ProxyConfig | None = None,
    lengths: str = "predicted",
    scale: float = 1.0,
    timeout_s: float = 600.0,
    poll_phase_s: float = 0.0,
    overhead_s: float = 0.0,
    label: str | None = None,
    workload: str = "",
    fleet_path: str | None = None,
) -> tuple[RunMeta, list[RequestRecord]]:
    """Simulate ``requests`` (arrivals divided by ``scale``) through ``policy``; the run's meta and records.

    ``lengths``: what the proxy knows of reply lengths (:data:`LENGTHS`).
    ``poll_phase_s``: when the first load reading falls after the trace starts (live, that phase is
    arbitrary, and queued policies whose budgets adapt to readings are sensitive to it).
    ``overhead_s``: a fixed latency added to every TTFT and E2E the client sees (the proxy and HTTP
    path; ~0.3 ms live, negligible; a replay at speedup K sees K times its wall-clock overhead).
    """
    config = proxy_config(fleet, policy, params, base)
    simulation = Simulation(
        fleet,
        requests,
        config,
        lengths=lengths,
        timeout_s=timeout_s,
        scale=scale,
        poll_phase_s=poll_phase_s,
        overhead_s=overhead_s,
    )
    records = simulation.run()
    classes = simulation.classifier.classes
    meta = RunMeta(
        label=label or (policy if lengths == "predicted" else f"{policy}+{lengths}"),
        source="simulate",
        workload=workload,
        target=fleet_path,
        speedup=1.0,
        duration_s=max((r.arrival_s for r in records), default=0.0),
        slo_classes={
            c.name: {"ttft_s": c.ttft_s, "tpot_s": c.tpot_s, "deadline_s": c.deadline_s} for c in classes.values()
        },
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        fleet=fleet_record(fleet.instances),
        extra={
            "policy": policy,
            "lengths": lengths,
            "scale": scale,
            "timeout_s": timeout_s,
            "poll_phase_s": poll_phase_s,
            "overhead_s": overhead_s,
            **simulation.stats(),
        },
    )
    return meta, records
