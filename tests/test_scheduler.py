"""Scheduler behaviour without servers: classification, bounded queues, shedding, timeouts, hints."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.adapters.tgi import TGIAdapter
from sloproxy.adapters.vllm import VLLMAdapter
from sloproxy.backends import BackendPool
from sloproxy.config import BackendConfig, HealthConfig, LoadPolling
from sloproxy.errors import ProxyError
from sloproxy.plugins import load_policy
from sloproxy.request import parse_request
from sloproxy.scheduler import URGENT_DEMAND_WEIGHT, Scheduler
from sloproxy.scheduler_config import SchedulingConfig
from sloproxy.slo import DEFAULT_CLASSES, Classifier, ModelDefaults, SLOClass, TenantConfig, tenant_named


def request(model: str = "m", slo: str = "interactive", **fields):
    r = parse_request(
        "chat", msgspec.json.encode({"model": model, "messages": [{"role": "user", "content": "x"}], **fields})
    )
    r.classify("t", next(c for c in DEFAULT_CLASSES if c.name == slo))
    return r


def scheduler(policy: str = "fcfs", budget: int = 1, **config) -> Scheduler:
    pool = BackendPool(
        [BackendConfig(name="b", engine="vllm", url="http://127.0.0.1:9", models=["m"])], HealthConfig(), LoadPolling()
    )
    return Scheduler(load_policy(policy), pool, SchedulingConfig(budget_initial=budget, **config))


# ----- classification ------------------------------------------------------------------------------
def test_class_resolution_order():
    classes = [*DEFAULT_CLASSES, SLOClass("gold", ttft_s=0.5, band=0)]
    acme = TenantConfig("acme", api_keys=["sk-acme"], default_class="batch")
    classifier = Classifier(classes, "interactive", [acme], {"big": ModelDefaults(default_class="gold")})
    assert classifier.classify(acme, {"x-slo-class": "gold"}, "m") == ("acme", classes[2])
    assert classifier.classify(acme, {}, "big")[1].name == "batch"  # tenant beats model
    assert classifier.classify(None, {}, "big")[1].name == "gold"  # model default
    assert classifier.classify(None, {}, "m") == ("default", classes[0])  # config default
    with pytest.raises(ProxyError) as error:
        classifier.classify(None, {"x-slo-class": "platinum"}, "m")
    assert error.value.status == 400 and error.value.param == "x-slo-class"


def test_tenant_header_names_the_tenant_in_open_mode_and_default_classes():
    classifier = Classifier([], None, [], {})
    assert set(classifier.classes) == {"interactive", "batch"}
    assert tenant_named(classifier.tenants, {"x-tenant": "blue"}).name == "blue"
    assert tenant_named(classifier.tenants, {}) is None
    interactive, batch = classifier.classes["interactive"], classifier.classes["batch"]
    assert (interactive.ttft_s, interactive.tpot_s, interactive.sheddable) == (1.5, 0.10, False)
    assert (batch.deadline_s, batch.sheddable) == (60.0, True)


def test_a_tenant_band_overrides_the_class_band_and_survives_a_new_estimate():
    r = request(slo="batch")
    r.classify("acme", r.slo, band=0)
    assert r.band == 0 and r.slo.band == 1
    r.classify("acme", r.slo, r.band)  # what estimates.py does after a prediction
    assert r.band == 0


def test_deadlines_follow_the_class():
    r = request(max_tokens=11)
    assert r.urgent_deadline == pytest.approx(r.received_at + 1.5)
    assert r.deadline == pytest.approx(r.received_at + 1.5 + 0.10 * 10)
    b = request(slo="batch")
    assert b.deadline == b.urgent_deadline == pytest.approx(b.received_at + 60)
    assert (r.band, b.band) == (0, 1) and r.urgency_rank < b.urgency_rank


# ----- queues ------------------------------------------------------------------------------------
async def test_queue_bounds_and_release_order():
    s = scheduler(budget=1, max_queue=2)
    first = request()
    backend = await s.acquire(first)
    waiting = [asyncio.ensure_future(s.acquire(request())) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ProxyError) as full:
        await s.acquire(request())
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
    assert s.counts["queue_full"] == 1
    assert not any(w.done() for w in waiting)
    s.release(first, backend)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [True, False]  # FCFS: the first waiter got the slot
    assert backend.in_flight == 1 and s.state.in_flight("b") == 1
    waiting[1].cancel()  # a client that leaves while waiting leaves the queue
    await asyncio.gather(waiting[1], return_exceptions=True)
    assert s.state.queue_depths() == {}


async def test_a_replaced_policy_takes_over_the_waiting_requests_in_its_own_order():
    s = scheduler("fcfs", budget=1)
    first = request()
    backend = await s.acquire(first)
    late_urgent, early_batch, leaving = request(slo="batch"), request(slo="batch"), request(slo="batch")
    early_batch.seq, late_urgent.seq = 1, 2
    waiting = [asyncio.ensure_future(s.acquire(r)) for r in (early_batch, leaving)]
    await asyncio.sleep(0)
    late_urgent.classify("t", DEFAULT_CLASSES[0])
    waiting.append(asyncio.ensure_future(s.acquire(late_urgent)))
    await asyncio.sleep(0)
    s.replace_policy(load_policy("priority-fair"))  # band 0 first
    assert len(s.queues["m"]) == 3 and s._timer is not None
    waiting[1].cancel()  # a client that leaves after the swap leaves the new queue
    await asyncio.gather(waiting[1], return_exceptions=True)
    assert len(s.queues["m"]) == 2
    s.release(first, backend)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [False, True, True]  # the urgent one went first
    s.replace_policy(load_policy("round-robin"))  # no queue: what still waits is routed at once
    await asyncio.sleep(0)
    assert waiting[0].done() and waiting[0].result() is backend
    assert s.state.queue_depths() == {} and s._queued_bytes == 0 and s._timer is None
    await s.stop()


async def test_interactive_work_that_cannot_start_in_time_is_refused_at_once_past_capacity():
    s = scheduler("edf", budget=1)
    first = request()
    backend = await s.acquire(first)  # holds the only slot
    waiting = [asyncio.ensure_future(s.acquire(request())) for _ in range(2)]
    await asyncio.sleep(0)
    s.drain.rate = lambda key: 1.0  # one request a second leaves the queue
    with pytest.raises(ProxyError) as refused:
        await s.acquire(request())  # 2 on time ahead, then itself, at 1/s: past its 1.5 s TTFT target
    assert refused.value.status == 429 and refused.value.code == "over_capacity"
    assert refused.value.headers == {"Retry-After": "1"} and s.counts["over_capacity"] == 1
    waiting.append(asyncio.ensure_future(s.acquire(request(slo="batch"))))  # sheddable: its own rule
    s.drain.rate = lambda key: 10.0
    waiting.append(asyncio.ensure_future(s.acquire(request())))  # at 10/s it starts in 0.3 s: it waits
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting) and len(s.queues["m"]) == 4
    s.config.refuse_overrun = False
    s.drain.rate = lambda key: 0.01
    waiting.append(asyncio.ensure_future(s.acquire(request())))  # switched off: it waits too
    await asyncio.sleep(0)
    assert not waiting[-1].done() and len(s.queues["m"]) == 5
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    s.release(first, backend)
    assert s.state.queue_depths() == {}


async def test_a_request_that_can_be_placed_never_waits_and_max_queue_bounds_only_waiters():
    s = scheduler(budget=2, max_queue=0)
    waited: list[str] = []
    s.predict_many = lambda batch: waited.extend(r.id for r in batch)
    first, second, third = request(), request(), request()
    for r in (first, second, third):
        r.estimate_source = "prior"
    backends = [await s.acquire(first), await s.acquire(second)]  # room: placed on arrival, no queue
    assert waited == [] and not s.queues.get("m")
    assert backends[0].in_flight == 2
    with pytest.raises(ProxyError) as full:  # no room: it would have to wait, and nothing may wait
        await s.acquire(third)
    assert full.value.status == 429 and full.value.code == "queue_full"
    assert waited == []  # refused before its prediction was paid for
    s.release(first, backends[0])
    assert (await s.acquire(request())).in_flight == 2  # the freed slot is taken on arrival


async def test_requests_that_must_wait_are_predicted_together_before_they_join_the_queue():
    s = scheduler(budget=1)
    batches: list[list[str]] = []
    s.predict_many = lambda batch: batches.append([r.id for r in batch])
    first = request()
    first.estimate_source = "prior"
    backend = await s.acquire(first)
    waiters = []
    for _ in range(3):
        r = request()
        r.estimate_source = "prior"
        waiters.append(r)
    tasks = [asyncio.ensure_future(s.acquire(r)) for r in waiters]
    await asyncio.sleep(0)
    assert not s.queues.get("m")  # not in the queue until predicted
    for _ in range(3):  # the batch runs; the waiters resume
        await asyncio.sleep(0)
    assert batches == [[r.id for r in waiters]] and len(s.queues["m"]) == 3  # one batch, then queued
    s.release(first, backend)
    await asyncio.sleep(0)
    assert [t.done() for t in tasks] == [True, False, False]
    for t in tasks[1:]:
        t.cancel()
    await asyncio.gather(*tasks[1:], return_exceptions=True)


async def test_a_waiter_cancelled_during_prediction_leaves_the_rest_of_its_batch_unharmed():
    """Its client went away while the batch it joined was being predicted: the others still queue."""
    s = scheduler(budget=1)
    s.predict_many = lambda batch: None
    first = request()
    backend = await s.acquire(first)
    waiters = [request() for _ in range(3)]
    for r in waiters:
        r.estimate_source = "prior"
    tasks = [asyncio.ensure_future(s.acquire(r)) for r in waiters]
    await asyncio.sleep(0)
    tasks[0].cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert tasks[0].cancelled() and not tasks[1].done() and not tasks[2].done()
    assert [r.id for r in s.queues["m"]] == [waiters[1].id, waiters[2].id]
    s.release(first, backend)
    assert (await tasks[1]).name == "b"
    tasks[2].cancel()
    await asyncio.gather(tasks[2], return_exceptions=True)


def _queue_is_empty(s: Scheduler) -> bool:
    """Nothing waits, and the bookkeeping of what waited is back to zero."""
    return not s.queues.get("m") and s._queued == 0 and s._queued_bytes == 0 and s.state.queue_depths() == {}


async def _one_running_one_to_predict():
    """A budget of one, taken; a second request arrives and must be predicted before it queues."""
    s = scheduler(budget=1)
    s.predict_many = lambda batch: None
    first = request()
    backend = await s.acquire(first)
    waiting = request()
    waiting.estimate_source = "prior"
    return s, first, backend, waiting, asyncio.ensure_future(s.acquire(waiting))


async def test_a_waiter_cancelled_after_its_batch_queued_it_leaves_the_queue():
    """The prediction batch queued it; its client goes away before a slot frees: it leaves the queue."""
    s, first, backend, waiting, task = await _one_running_one_to_predict()
    for _ in range(3):  # the acquire starts, the batch runs and queues it
        await asyncio.sleep(0)
    assert [r.id for r in s.queues["m"]] == [waiting.id] and not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and _queue_is_empty(s) and not s._waiters
    s.release(first, backend)
    assert backend.in_flight == 0 and not s._running


async def test_a_request_dispatched_by_its_batch_whose_client_left_frees_its_slot():
    """A slot freed while it was being predicted: the batch dispatches it, but its client has gone
    before its handler resumed. The slot returns and nothing is left waiting."""
    s, first, backend, waiting, task = await _one_running_one_to_predict()
    await asyncio.sleep(0)  # it must wait: its prediction is due on the next turn
    s.release(first, backend)  # nothing queued yet: the slot stays free
    await asyncio.sleep(0)  # the batch queues it and dispatches it at once
    assert id(waiting) in s._running and not task.done()
    task.cancel()  # before its handler resumed
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and backend.in_flight == 0 and not s._running and _queue_is_empty(s)


async def test_a_request_refused_after_its_prediction_gets_the_refusal_and_the_rest_of_its_batch_queues():
    """Both fit the queue before their predictions; the batch admits the first and refuses the second."""
    s = scheduler(budget=1, max_queue=1)
    batches: list[list[str]] = []
    s.predict_many = lambda batch: batches.append([r.id for r in batch])
    first = request()
    backend = await s.acquire(first)
    waiters = [request(), request()]
    for r in waiters:
        r.estimate_source = "prior"
    tasks = [asyncio.ensure_future(s.acquire(r)) for r in waiters]
    for _ in range(3):
        await asyncio.sleep(0)
    assert batches == [[r.id for r in waiters]]
    assert tasks[1].done() and isinstance(tasks[1].exception(), ProxyError)
    assert tasks[1].exception().code == "queue_full" and tasks[1].exception().status == 429
    assert not tasks[0].done() and [r.id for r in s.queues["m"]] == [waiters[0].id]
    s.release(first, backend)
    assert (await tasks[0]).name == "b"
    s.release(waiters[0], backend)
    assert backend.in_flight == 0 and _queue_is_empty(s)


async def test_with_a_queue_an_arrival_waits_its_turn_even_if_a_slot_is_free():
    s = scheduler(budget=1)
    first = request()
    backend = await s.acquire(first)
    queued = asyncio.ensure_future(s.acquire(request()))
    await asyncio.sleep(0)
    s.release(first, backend)  # dispatches the waiter synchronously: the slot never looks free
    later = asyncio.ensure_future(s.acquire(request()))
    await asyncio.sleep(0)
    assert queued.done() and not later.done()  # the arrival found a queue: it joined it
    assert len(s.queues["m"]) == 1


async def test_timeouts_and_shedding():
    s = scheduler(budget=1, queue_timeout_s=0.05, tick_s=0.01)
    s.start()
    try:
        await s.acquire(request())
        interactive = asyncio.ensure_future(s.acquire(request()))
        batch = request(slo="batch")
        shed = asyncio.ensure_future(s.acquire(batch))
        await asyncio.sleep(0.01)
        batch.deadline = 0.0  # its deadline has passed: sheddable work goes at the next tick
        with pytest.raises(ProxyError) as shed_error:
            await asyncio.wait_for(shed, 1)
        assert shed_error.value.status == 429 and shed_error.value.code == "deadline_exceeded"
        with pytest.raises(ProxyError) as timeout:
            await asyncio.wait_for(interactive, 1)
        assert timeout.value.status == 503 and timeout.value.code == "queue_timeout"  # not sheddable: 503
        assert s.counts["deadline_exceeded"] == 1 and s.counts["queue_timeout"] == 1
    finally:
        await s.stop()


async def test_unknown_model_and_no_backend():
    s = scheduler()
    with pytest.raises(ProxyError) as missing:
        await s.acquire(request(model="nope"))
    assert missing.value.status == 404
    s.pool.backends[0].healthy = False
    with pytest.raises(ProxyError) as down:
        await s.acquire(request())
    assert down.value.status == 503


# ----- hints to engines ------------------------------------------------------------------------------
def test_priority_hints_per_engine():
    urgent, lazy = request(priority=2), request(slo="batch", priority=-1)
    assert (urgent.urgency_rank, lazy.urgency_rank) == (2, 999)
    assert json.loads(VLLMAdapter(priority_scheduling=True).build(urgent).body)["priority"] == 2
    assert json.loads(SGLangAdapter(priority_scheduling=True).build(urgent).body)["priority"] == -2
    for adapter in (VLLMAdapter(), SGLangAdapter(), TGIAdapter()):  # not configured: never sent
        assert "priority" not in json.loads(adapter.build(lazy).body)


def test_shedding_predicts_whether_the_deadline_can_still_be_met():
    s = scheduler(shed_tpot_s=0.05)
    batch = request(slo="batch", max_tokens=200)  # 200 tokens x 0.05 s = 10 s of work, deadline in 60 s
    assert not s.hopeless(batch, batch.received_at + 49.0)
    assert s.hopeless(batch, batch.received_at + 51.0)  # 51 + 10 > 60: it cannot finish in time
    assert not s.hopeless(request(max_tokens=200), 1e12)  # interactive work is never shed


def test_outwaited_sheddable_work_is_refused_unless_that_shedding_is_off():
    for shed, refused in ((True, True), (False, False)):
        s = scheduler(shed_tpot_s=0.05, shed_outwaited=shed)
        batch = request(slo="batch", max_tokens=200)  # 10 s of work, deadline in 60 s
        s.drain.waiting[(batch.model, "batch")] = 5
        # the queue ahead (and the classes before it) drains in 55 s
        s.drain.wait_behind_s = lambda key, ahead, classes_ahead: 55.0  # type: ignore[method-assign]
        assert s.outwaited(batch, batch.received_at) is refused
        assert not s.hopeless(batch, batch.received_at)  # dispatched now, it would still finish in time


def test_priority_scheduling_backends_take_urgent_work_past_the_budget_instead_of_evicting():
    from sloproxy.policies.base import Snapshot
    from sloproxy.policies.parts import BudgetAdmission, EvictForUrgent

    pool = BackendPool(
        [BackendConfig(name="p", engine="vllm", url="http://127.0.0.1:9", models=["m"], priority_scheduling=True)],
        HealthConfig(),
        LoadPolling(),
    )
    s = Scheduler(load_policy("priority-fair"), pool, SchedulingConfig(budget_initial=8))
    backend = pool.backends[0]
    assert (backend.budget, backend.urgent_budget) == (8, 10)
    backend.in_flight = 9
    snapshot = Snapshot(0.0, pool.backends)
    assert BudgetAdmission().admit(request(), backend, snapshot)  # band 0 may use the engine's preemption
    assert not BudgetAdmission().admit(request(slo="batch"), backend, snapshot)
    urgent = request()
    urgent.urgent_deadline = 0.1
    victim = request(slo="batch")
    victim.backend = "p"
    backend.in_flight = 10
    assert EvictForUrgent().actions(snapshot, [urgent], [victim]) == []  # the engine preempts, not the proxy
    assert s.policy.fleet is not None


async def test_first_token_event_is_recorded():
    s = scheduler()
    r = request()
    backend = await s.acquire(r)
    assert r.first_token_at is None
    s.first_token(r, backend)
    assert r.first_token_at is not None and r.first_token_at >= r.received_at


async def test_a_request_placed_with_the_prior_is_predicted_under_way_and_its_reservation_follows():
    s = scheduler(policy="slo", budget=4)
    predicted: list[str] = []

    def predict_many(batch):
        for r in batch:
            predicted.append(r.id)
            r.pred_p50, r.pred_p90, r.est_output_tokens, r.estimate_source = 10.0, 20.0, 10, "model"

    s.predict_many = predict_many
    r = request()
    r.pred_p50, r.pred_p90, r.est_output_tokens, r.estimate_source = 300.0, 900.0, 300, "prior"
    backend = await s.acquire(r)
    assert predicted == [] and backend.kv_reserved_tokens == r.est_prompt_tokens + 900  # placed with the prior
    s.under_way(r, backend)
    assert predicted == []  # batched: on the loop's next turn
    await asyncio.sleep(0)
    assert predicted == [r.id] and backend.kv_reserved_tokens == r.est_prompt_tokens + 20 == r.kv_reserved
    s.first_token(r, backend)  # already predicted: nothing more
    await asyncio.sleep(0)
    assert predicted == [r.id]
    s.release(r, backend)
    assert backend.kv_reserved_tokens == 0 and backend.in_flight == 0


async def test_a_request_placed_with_the_prior_that_finishes_before_its_batch_is_not_predicted():
    """A stream relayed whole in one read ends before the loop's next turn: nothing is left to correct."""
    s = scheduler(policy="slo", budget=4)
    predicted: list[str] = []
    s.predict_many = lambda batch: predicted.extend(r.id for r in batch)
    done, running = request(), request()
    for r in (done, running):
        r.pred_p50, r.pred_p90, r.est_output_tokens, r.estimate_source = 300.0, 900.0, 300, "prior"
    backends = [await s.acquire(done), await s.acquire(running)]
    s.first_token(done, backends[0])
    s.first_token(running, backends[1])
    s.release(done, backends[0])
    await asyncio.sleep(0)
    assert predicted == [running.id]
    assert backends[0].kv_reserved_tokens == running.kv_reserved == running.est_prompt_tokens + 900


# ----- budget adaptation --------------------------------------------------------------------------
def _reading(s: Scheduler, running: int, waiting: int, in_flight: int | None = None, sent: int = 0) -> int:
    """One load reading of backend ``b``; ``sent``: requests dispatched since the previous one."""
    from sloproxy.adapters.base import BackendLoad

    backend = s.pool.backends[0]
    backend.mine = backend.in_flight = running + waiting if in_flight is None else in_flight
    backend.dispatched_since_reading = sent
    backend.load = BackendLoad(running=running, waiting=waiting, kv_usage=0.1)
    s._on_load_update(backend)
    return backend.budget


def test_budget_probes_double_while_the_engine_keeps_up_and_restart_at_one_after_a_drop():
    s = scheduler(budget=8, probe_after_updates=2)
    backend = s.pool.backends[0]
    assert [_reading(s, 8, 1), _reading(s, 8, 1)] == [8, 8]  # waiting on two readings: the ceiling is 8
    assert backend.ceiling == 8
    budgets = [_reading(s, backend.budget, 0) for _ in range(8)]  # full, nothing waiting: probe every 2 readings
    assert budgets == [8, 9, 9, 11, 11, 15, 15, 23]  # +1, +2, +4, +8
    _reading(s, 20, 3)
    assert _reading(s, 20, 3) == 20 and backend.ceiling == 22  # the engine ran 20: budget there, ceiling one down
    budgets = [_reading(s, backend.budget, 0) for _ in range(4)]
    assert budgets == [22, 23, 23, 25]  # back to the ceiling at once, then probes from +1 again: +1, +2


def _blind_reading(s: Scheduler, running: int, in_flight: int | None = None, waiting: int = 0) -> int:
    """A reading of a backend whose metrics say nothing of KV (no metrics, an OpenAI API)."""
    from sloproxy.adapters.base import BackendLoad

    backend = s.pool.backends[0]
    backend.mine = backend.in_flight = running + waiting if in_flight is None else in_flight
    backend.load = BackendLoad(running=running, waiting=waiting)
    s._on_load_update(backend)
    return backend.budget


def test_a_backend_that_reports_no_kv_doubles_its_budget_until_work_waits():
    s = scheduler(budget=8)
    backend = s.pool.backends[0]
    assert _blind_reading(s, 8, in_flight=5) == 8  # the budget is not what limits: no growth
    budgets = [_blind_reading(s, backend.budget) for _ in range(6)]
    assert budgets == [16, 32, 64, 128, 256, 256]  # slow start, capped by budget_max
    assert backend.ceiling is None

    s = scheduler(budget=8)
    backend = s.pool.backends[0]
    assert [_blind_reading(s, 8), _blind_reading(s, 16)] == [16, 32]
    [_blind_reading(s, 30, waiting=2) for _ in range(2)]  # waiting on two readings: it runs 30
    assert (backend.budget, backend.ceiling) == (30, 30)
    assert _blind_reading(s, 30) == 30  # a ceiling is known now: no more doubling


def test_an_engine_that_reports_kv_climbs_by_an_eighth_from_the_start():
    s = scheduler(budget=16)
    assert [_reading(s, b, 0) for b in (16, 18, 20)] == [18, 20, 22]  # kv 10%: still an eighth


class _OneOfThree:
    """A stand-in for the Redis coordinator: this replica may use the whole budget, and the fleet
    holds three times what it holds."""

    def share(self, backend: str) -> int:
        return 1_000

    def remote_in_flight(self, backend: str) -> int:
        return 0


def test_with_replicas_waiting_that_fresh_dispatches_explain_does_not_shrink_the_budget():
    s = scheduler(budget=16)
    s.shared = _OneOfThree()  # type: ignore[assignment]
    # 3 waiting; this replica holds 5 of the fleet's 15 in flight and sent 1: the fleet sent about 3
    for _ in range(4):
        assert _reading_as(s, 12, 3, mine=5, in_flight=15, sent=1) == 16
    assert _reading_as(s, 12, 4, mine=5, in_flight=15, sent=1) == 16  # 4 > 3 fresh: once is not evidence
    assert _reading_as(s, 12, 4, mine=5, in_flight=15, sent=1) == 12  # twice in a row: the engine runs 12


def test_one_replica_counts_all_waiting_as_evidence():
    """On the bursty code trace, discounting fresh dispatches cost one replica a scale step."""
    s = scheduler(budget=16)
    _reading(s, 13, 3, sent=3)
    assert _reading(s, 13, 3, sent=3) == 13


def _reading_as(s: Scheduler, running: int, waiting: int, mine: int, in_flight: int, sent: int) -> int:
    """A reading where this replica holds ``mine`` of the fleet's ``in_flight``."""
    from sloproxy.adapters.base import BackendLoad

    backend = s.pool.backends[0]
    backend.mine, backend.in_flight, backend.dispatched_since_reading = mine, in_flight, sent
    backend.load = BackendLoad(running=running, waiting=waiting, kv_usage=0.1)
    s._on_load_update(backend)
    return backend.budget


class _Fleet:
    """A stand-in for the Redis coordinator: a share of 4 slots, and what the other replicas have
    waiting as of the last sync (set by the test)."""

    def __init__(self) -> None:
        self.remote_waiting: dict[tuple[str, str], int] = {}
        self.reported: dict[str, int] = {}  # backend -> demand at the last report
        self.syncs_asked = 0
        self.degraded = False

    def share(self, backend: str) -> int:
        return 4

    def remote_in_flight(self, backend: str) -> int:
        return 0

    def remote_kv_tokens(self, backend: str) -> int:
        return 0

    def remote_queue_depths(self) -> dict[tuple[str, str], int]:
        return self.remote_waiting

    def request_sync(self) -> None:
        self.syncs_asked += 1

    def update_local(self, backend: str, in_flight: int, kv_tokens: int, demand: int) -> None:
        self.reported[backend] = demand


async def test_with_urgent_work_waiting_at_another_replica_lower_bands_wait_and_ask_for_no_slot():
    """One queue for the fleet would serve band 0 first wherever it arrived: a replica leaves the
    slots it frees to it instead of filling them with its own batch work."""
    s = scheduler("priority-fair", budget=4)  # band 0 first; batch may fill 3 of the 4 slots
    fleet = _Fleet()
    s.shared = fleet  # type: ignore[assignment]
    s.shares_changed()
    held = [request() for _ in range(4)]
    backends = [await s.acquire(r) for r in held]  # the share is full
    lower = request(slo="batch")
    batch = asyncio.ensure_future(s.acquire(lower))
    interactive = request()
    mine_urgent = asyncio.ensure_future(s.acquire(interactive))
    await asyncio.sleep(0)
    s._report_to_fleet()
    assert fleet.reported["b"] == 4 + 1 + URGENT_DEMAND_WEIGHT  # in flight + batch + band 0 x4

    fleet.remote_waiting = {("m", "interactive"): 3}  # another replica's interactive work waits
    s.shares_changed()
    s.release(held[0], backends[0])
    await asyncio.sleep(0)
    assert mine_urgent.done() and not batch.done()  # its own band 0 still goes first
    for r, backend in zip(held[1:3], backends[1:3], strict=True):
        s.release(r, backend)
    await asyncio.sleep(0)
    assert s.pool.backends[0].mine == 2 and not batch.done()  # the freed slots are left to the urgent work
    asked = fleet.syncs_asked
    s._report_to_fleet()
    assert fleet.reported["b"] == 2  # in flight only: the held-back batch is not asked for
    s.dispatch_all()
    assert fleet.syncs_asked > asked  # holding back asks for a sync, so the slots move soon

    fleet.remote_waiting = {("m", "batch"): 5}  # the urgent work was served: only batch waits there
    s.shares_changed()
    await asyncio.sleep(0)
    assert batch.done()

    # Redis goes away while the last sync said urgent work waits elsewhere: that view is no reason
    # to hold work back for the whole outage.
    s.release(held[3], backends[3])
    fleet.remote_waiting = {("m", "interactive"): 3}
    s.shares_changed()
    later = request(slo="batch")
    batch_in_outage = asyncio.ensure_future(s.acquire(later))
    await asyncio.sleep(0)
    assert not batch_in_outage.done()
    fleet.degraded = True
    s.dispatch_all()
    await asyncio.sleep(0)
    assert batch_in_outage.done()
    for r, future in ((interactive, mine_urgent), (lower, batch), (later, batch_in_outage)):
        s.release(r, future.result())
    assert s.pool.backends[0].mine == 0


async def test_a_head_that_falls_overdue_while_it_is_placed_is_the_one_dispatched():
    """Time moves between peeking the queue's head and popping it: here placing it takes 100 s, as on
    a machine slow enough for deadlines to pass mid-dispatch. The head placed is the head dispatched,
    and the request behind it keeps waiting for the next slot: none leaves the queue undispatched
    (an EDF that re-judged at pop handed back the on-time request behind, which was lost)."""
    now = [0.0]
    policy = load_policy("edf")
    admitting = policy.admitting

    def slow_admitting(request, backends, snapshot):
        now[0] += 100.0
        return admitting(request, backends, snapshot)

    policy.admitting = slow_admitting
    pool = BackendPool(
        [BackendConfig(name="b", engine="vllm", url="http://127.0.0.1:9", models=["m"])], HealthConfig(), LoadPolling()
    )
    s = Scheduler(policy, pool, SchedulingConfig(budget_initial=1), clock=lambda: now[0])
    first = request()
    first.received_at = 0.0
    backend = await s.acquire(first)
    now[0] = 0.0  # placing the first took its 100 s
    early, late = request(), request()
    early.received_at, late.received_at = 0.0, 1000.0  # on time when peeked; only the early one falls overdue
    for r in (early, late):
        r.classify(r.tenant, r.slo)
    waiting = [asyncio.ensure_future(s.acquire(r)) for r in (early, late)]
    await asyncio.sleep(0)
    assert len(s.queues["m"]) == 2
    s.release(first, backend)  # dispatches the head: placing it moves the clock past its deadline
    assert (await asyncio.wait_for(waiting[0], 1)) is backend and id(early) in s._running
    assert not waiting[1].done() and [r.id for r in s.queues["m"]] == [late.id]
    s.release(early, backend)
    assert (await asyncio.wait_for(waiting[1], 1)) is backend and not s.queues["m"]


async def test_a_confined_head_does_not_hold_back_work_for_backends_it_cannot_use():
    """A head that only one full backend can hold (a window too small elsewhere) is set aside for the
    call: the request behind it goes to the backend it cannot use, never to the one it waits for, and
    it is the queue's head again afterwards, queued once. Confined by something else than size (the
    same windows), it holds the queue as before."""
    for small_window, set_aside in ((4096, True), (8192, False)):
        pool = BackendPool(
            [
                BackendConfig(
                    name="big", engine="vllm", url="http://127.0.0.1:9", models=["m"], max_context_tokens=8192
                ),
                BackendConfig(
                    name="small", engine="vllm", url="http://127.0.0.1:9", models=["m"], max_context_tokens=small_window
                ),
            ],
            HealthConfig(),
            LoadPolling(),
        )
        await _confined_head(pool, set_aside)


async def _confined_head(pool: BackendPool, set_aside: bool) -> None:
    s = Scheduler(load_policy("edf"), pool, SchedulingConfig(budget_initial=1))
    running, confined, behind = request(), request(), request()
    running.excluded.add("small")
    confined.excluded.add("small")
    assert (await s.acquire(running)).name == "big"
    head = asyncio.ensure_future(s.acquire(confined))
    await asyncio.sleep(0)
    assert not head.done()  # big is full and small cannot hold it
    queue = s.queues["m"]
    if not set_aside:
        waiting = asyncio.ensure_future(s.acquire(behind))
        await asyncio.sleep(0)
        assert not waiting.done() and len(queue) == 2  # the head of line holds
        s.release(running, pool.backends[0])
        assert (await head).name == "big" and (await waiting).name == "small"
        return
    assert (await asyncio.wait_for(s.acquire(behind), 5)).name == "small"  # not held back by the head
    assert len(queue) == 1 and list(queue) == [confined] and queue.peek() is confined
    s.release(running, pool.backends[0])
    assert (await head).name == "big"
    assert len(queue) == 0 and list(queue) == []


def test_an_ordering_restores_a_removed_head_once():
    from sloproxy.policies.orderings import edf, fifo

    for make in (fifo, edf):
        queue = make()
        first, second = request(), request()
        queue.push(first)
        queue.push(second)
        assert queue.peek() is first and queue.remove(first)
        queue.push(first)
        assert queue.peek() is first and len(queue) == 2 and sorted(map(id, queue)) == sorted(map(id, (first, second)))
        assert queue.pop() is first and queue.pop() is second and list(queue) == []
