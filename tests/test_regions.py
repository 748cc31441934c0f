"""Regions (SageServe): region choice on hand-made backend states, hold-back and release, config errors."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from sloproxy.adapters.base import BackendLoad
from sloproxy.backends import BackendPool
from sloproxy.config import BackendConfig, ConfigError, HealthConfig, LoadPolling, parse_config
from sloproxy.errors import ProxyError
from sloproxy.plugins import load_policy
from sloproxy.proxy_metrics import ProxyMetrics
from sloproxy.regions import RegionRouter, RegionsConfig
from sloproxy.request import parse_request
from sloproxy.scheduler import Scheduler
from sloproxy.scheduler_config import SchedulingConfig
from sloproxy.slo import DEFAULT_CLASSES, TenantConfig
from tests.helpers import metric_samples

LAYOUT = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "ap-1": "ap"}


def pool() -> BackendPool:
    configs = [
        BackendConfig(name=n, engine="vllm", url="http://127.0.0.1:9", models=["m"], region=r, pool="spot")
        for n, r in LAYOUT.items()
    ]
    return BackendPool(configs, HealthConfig(), LoadPolling())


def set_kv(p: BackendPool, **usage: float) -> None:
    for b in p.backends:
        if b.name.replace("_", "-") in {k.replace("_", "-") for k in usage}:
            b.load = BackendLoad(running=1, waiting=0, kv_usage=usage[b.name.replace("-", "_")])
            b.load_read_at = b.clock()


def router(p: BackendPool, **config) -> RegionRouter:
    return RegionRouter(RegionsConfig(**config), p.backends, DEFAULT_CLASSES)


def request(slo: str = "interactive"):
    r = parse_request("chat", msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    r.classify("t", next(c for c in DEFAULT_CLASSES if c.name == slo))
    return r


def test_first_preferred_region_under_threshold_else_least_utilised():
    p = pool()
    r = router(p, preference=["eu", "us"])
    assert r.regions == ("eu", "us", "ap") and r.active
    set_kv(p, eu_1=0.5, eu_2=0.6, us_1=0.1, ap_1=0.0)
    assert r.choose("m", ("eu", "us", "ap")) == "eu"  # mean 0.55 < 0.7
    set_kv(p, eu_1=0.8, eu_2=0.9, us_1=0.75, ap_1=0.9)
    assert r.choose("m", ("eu", "us", "ap")) == "us"  # all over the threshold: the least utilised (0.75 < 0.85)
    set_kv(p, eu_1=0.9, eu_2=0.9, us_1=0.2, ap_1=0.0)
    assert r.choose("m", ("eu", "us", "ap")) == "us"  # eu over: next preferred under threshold, not least (ap)
    assert r.choose("m", ("ap", "eu")) == "ap"
    for b in p.backends:
        if b.config.region == "us":
            b.probe_healthy = False
            b.update_routable()
    assert r.choose("m", ("us", "eu")) == "eu"  # us has nothing routable
    assert r.choose("m", ("eu", "ap"), excluded={"ap-1"}) == "eu"


def test_threshold_is_configurable_and_least_utilised_breaks_ties_by_preference():
    p = pool()
    set_kv(p, eu_1=0.5, eu_2=0.5, us_1=0.4, ap_1=0.4)
    assert router(p, interactive_kv_threshold=0.45, release_kv_threshold=0.4).choose("m", ("eu", "us", "ap")) == "us"
    assert router(p, interactive_kv_threshold=0.3, release_kv_threshold=0.3).choose("m", ("eu", "ap", "us")) == "ap"


def test_header_beats_tenant_beats_fleet_and_bad_headers_are_400():
    p = pool()
    r = router(p, preference=["us"])
    tenant = TenantConfig("acme", regions=["ap"])
    assert r.preference(None, {}) == ("us", "eu", "ap")
    assert r.preference(tenant, {}) == ("ap", "us", "eu")
    assert r.preference(tenant, {"x-sloproxy-region": "eu, us"}) == ("eu", "us", "ap")
    for bad in ("mars", "", "eu,,us", ",".join(["eu"] * 17)):
        with pytest.raises(ProxyError) as error:
            r.preference(tenant, {"x-sloproxy-region": bad})
        assert error.value.status == 400 and error.value.param == "x-sloproxy-region"


def test_one_region_builds_no_router():
    p = BackendPool(
        [BackendConfig(name="b", engine="vllm", url="http://127.0.0.1:9", models=["m"])], HealthConfig(), LoadPolling()
    )
    assert not router(p).active


def test_config_errors_name_the_field():
    base = {"backends": [{"name": "a", "engine": "vllm", "url": "http://x", "models": ["m"], "region": "eu"}]}
    cases = [
        ({"regions": {"preference": ["us"]}}, "$.regions.preference[0]"),
        ({"regions": {"held_classes": ["gold"]}}, "$.regions.held_classes[0]"),
        ({"regions": {"interactive_kv_threshold": 1.5}}, "$.regions.interactive_kv_threshold"),
        ({"regions": {"release_kv_threshold": 0.8}}, "$.regions.release_kv_threshold"),
        ({"regions": {"typo": 1}}, "typo"),
        ({"tenants": [{"name": "t", "regions": ["mars"]}]}, "$.tenants[0].regions[0]"),
    ]
    for extra, field in cases:
        with pytest.raises(ConfigError, match=field.replace("$", r"\$").replace("[", r"\[")):
            parse_config({**base, **extra})
    with pytest.raises(ConfigError, match=r"\$.backends\[0\].region"):
        parse_config({"backends": [{**base["backends"][0], "region": 3}]})
    assert parse_config(base).backends[0].region == "eu"


@pytest.mark.parametrize("policy", ["fcfs", "round-robin", "least-load", "slo"])
async def test_interactive_routed_in_region_and_batch_held_until_utilisation_drops(policy):
    p = pool()
    scheduler = Scheduler(load_policy(policy), p, SchedulingConfig(budget_initial=64, queue_timeout_s=5))
    scheduler.regions = router(p, preference=["eu", "us"])
    scheduler.start()
    try:
        set_kv(p, eu_1=0.1, eu_2=0.1, us_1=0.0, ap_1=0.0)
        for _ in range(4):
            r = request()
            r.regions = scheduler.regions.preference(None, {})
            backend = await scheduler.acquire(r)
            assert backend.config.region == "eu"
            scheduler.release(r, backend)
        set_kv(p, eu_1=0.9, eu_2=0.8, us_1=0.65, ap_1=0.0)
        r = request()
        r.regions = ("eu", "us", "ap")
        assert (await scheduler.acquire(r)).config.region == "us"
        # batch: pinned to us (the interactive choice), held while us is above 0.6
        held = [request("batch") for _ in range(3)]
        tasks = [asyncio.ensure_future(scheduler.acquire(h)) for h in held]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)
        assert scheduler.regions.depths() == {("m", "us"): 3}
        set_kv(p, us_1=0.3)
        scheduler.release(r, p.backends[2])  # a completion in us releases release_per_completion (2)
        await asyncio.sleep(0)
        assert sum(t.done() for t in tasks) == 2
        done = await asyncio.wait_for(asyncio.gather(*tasks), 2)  # the timer releases the last
        assert {b.config.region for b in done} == {"us"}
        chosen = scheduler.regions.chosen
        assert chosen == {("m", "us", "spot"): 4, ("m", "eu", "spot"): 4}
    finally:
        await scheduler.stop()


async def test_held_work_times_out_with_an_explicit_error():
    p = pool()
    scheduler = Scheduler(load_policy("fcfs"), p, SchedulingConfig(queue_timeout_s=0.2))
    scheduler.regions = router(p)
    scheduler.start()
    try:
        set_kv(p, eu_1=0.95, eu_2=0.95, us_1=0.95, ap_1=0.95)
        with pytest.raises(ProxyError) as error:
            await asyncio.wait_for(scheduler.acquire(request("batch")), 3)
        assert error.value.status == 429 and error.value.code == "queue_timeout"
        assert scheduler.regions.depths()[("m", "eu")] == 0
    finally:
        await scheduler.stop()


async def test_max_queue_counts_held_work_and_refuses_with_the_queue_full_error():
    p = pool()
    scheduler = Scheduler(load_policy("fcfs"), p, SchedulingConfig(budget_initial=1, max_queue=3, queue_timeout_s=5))
    scheduler.regions = router(p, preference=["eu"])
    scheduler.start()
    tasks: list[asyncio.Future] = []

    def start(r):
        tasks.append(asyncio.ensure_future(scheduler.acquire(r)))
        return tasks[-1]

    try:
        # eu is under the interactive threshold (0.7) but over the release threshold (0.6)
        set_kv(p, eu_1=0.65, eu_2=0.65, us_1=0.65, ap_1=0.65)
        batch = [request("batch") for _ in range(3)]
        gone = start(batch[0])
        start(batch[1])
        await asyncio.sleep(0)
        assert scheduler.regions.depths() == {("m", "eu"): 2} and scheduler.regions.held_count == 2
        first = [request(), request()]
        placed = [await scheduler.acquire(r) for r in first]  # one per eu backend (budget 1)
        assert {b.name for b in placed} == {"eu-1", "eu-2"}
        waiting = request()
        start(waiting)  # no room in eu: it waits in the scheduler's queue
        await asyncio.sleep(0)
        assert len(scheduler.queues["m"]) == 1
        # 2 held + 1 queued = max_queue: the next one is refused whether it would wait queued or held
        for slo in ("interactive", "batch"):
            with pytest.raises(ProxyError) as caught:
                await scheduler.acquire(request(slo))
            error = caught.value
            assert (error.status, error.code) == (429, "queue_full")
            assert error.message == "The proxy queue is full; retry later."
            assert error.headers == {"Retry-After": str(scheduler.config.retry_after_s)}
        assert scheduler.counts["queue_full"] == 2 and scheduler.regions.held_count == 2
        # a held request whose client leaves frees its place
        gone.cancel()
        await asyncio.sleep(0)
        assert scheduler.regions.held_count == 1 and scheduler.regions.held_bytes == len(batch[0].raw)
        start(batch[2])
        await asyncio.sleep(0)
        assert scheduler.regions.held_count == 2
        set_kv(p, eu_1=0.1, eu_2=0.1)  # room: the timer releases both into the scheduler's queue
        await asyncio.sleep(0.2)
        assert (scheduler.regions.held_count, scheduler.regions.held_bytes) == (0, 0)
        assert len(scheduler.queues["m"]) == 3  # the budgets are full: they wait there, counted once
        assert not any(t.done() for t in tasks[1:])
        for r, b in zip(first, placed, strict=True):
            scheduler.release(r, b)  # each completion dispatches the queue's head
        await asyncio.sleep(0)
        # fcfs: by arrival (the batch requests were received before `waiting`)
        assert [t.done() for t in tasks[1:]] == [True, False, True]
        scheduler.release(batch[1], tasks[1].result())
        backend = await asyncio.wait_for(tasks[2], 1)
        for r, t in ((batch[2], tasks[3]), (waiting, tasks[2])):
            scheduler.release(r, t.result())
        assert backend.config.region == "eu" and not scheduler._running
    finally:
        await scheduler.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_new_router_takes_over_held_work_none_lost_new_order_and_tags_apply():
    p = pool()
    scheduler = Scheduler(load_policy("fcfs"), p, SchedulingConfig(budget_initial=64, queue_timeout_s=5))
    scheduler.regions = router(p, preference=["eu", "us"])
    scheduler.start()
    set_kv(p, eu_1=0.65, eu_2=0.65, us_1=0.65, ap_1=0.65)  # everywhere over the release threshold
    fleet_ordered = [request("batch") for _ in range(3)]
    by_header = request("batch")
    by_header.regions = scheduler.regions.preference(None, {"x-sloproxy-region": "ap"})
    tasks = {id(r): asyncio.ensure_future(scheduler.acquire(r)) for r in (*fleet_ordered, by_header)}
    try:
        await asyncio.sleep(0)
        assert scheduler.regions.depths() == {("m", "eu"): 3, ("m", "ap"): 1}
        first = await scheduler.acquire(request())
        assert first.config.region == "eu"
        # reload: the fleet's order changes; work that followed it follows the new one, the header's stays
        scheduler.replace_regions(router(p, preference=["us", "eu"]))
        await asyncio.sleep(0)
        assert scheduler.regions.depths() == {("m", "us"): 3, ("m", "ap"): 1}
        assert scheduler.regions.held_count == 4 and not any(t.done() for t in tasks.values())
        assert scheduler.regions.chosen == {("m", "eu", "spot"): 1}  # the counters carry over
        # reload: ap-1 is retagged into us; ap no longer exists, so the header's order falls back to eu
        ap = next(b for b in p.backends if b.name == "ap-1")
        ap.config = msgspec.structs.replace(ap.config, region="us", pool="reserved")
        scheduler.replace_regions(router(p, preference=["us", "eu"]))
        await asyncio.sleep(0)
        assert scheduler.regions.regions == ("us", "eu")
        assert scheduler.regions.depths() == {("m", "us"): 3, ("m", "eu"): 1}
        set_kv(p, us_1=0.1, ap_1=0.0)  # room in us (now us-1 and ap-1): the timer releases its held work
        done = await asyncio.wait_for(asyncio.gather(*(tasks[id(r)] for r in fleet_ordered)), 2)
        assert {b.name for b in done} <= {"us-1", "ap-1"}
        assert not tasks[id(by_header)].done()
        # reload down to one router-less fleet: what is still held goes on to the scheduler at once
        scheduler.replace_regions(None)
        assert (await asyncio.wait_for(tasks[id(by_header)], 1)).name in {b.name for b in p.backends}
        assert scheduler.regions is None and scheduler.counts["queue_timeout"] == 0
    finally:
        await scheduler.stop()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def test_region_metrics_label_dispatches_by_pool():
    tags = {"eu-1": ("eu", "spot"), "eu-2": ("eu", "reserved"), "us-1": ("us", None)}
    configs = [
        BackendConfig(name=n, engine="vllm", url="http://127.0.0.1:9", models=["m"], region=r, pool=tag)
        for n, (r, tag) in tags.items()
    ]
    p = BackendPool(configs, HealthConfig(), LoadPolling())
    scheduler = Scheduler(load_policy("round-robin"), p, SchedulingConfig())
    scheduler.regions = router(p, preference=["eu", "us"])
    metrics = ProxyMetrics(p)
    metrics.attach(scheduler)
    set_kv(p, eu_1=0.1, eu_2=0.1, us_1=0.0)
    for preference in [("eu", "us")] * 3 + [("us", "eu")]:
        r = request()
        r.regions = preference
        scheduler.release(r, await scheduler.acquire(r))

    def dispatched() -> dict[tuple[str, str, str], float]:
        samples = metric_samples(metrics.render().decode())["sloproxy_region_dispatched_total"]
        return {(labels["model"], labels["region"], labels["pool"]): value for labels, value in samples}

    assert dispatched() == {("m", "eu", "reserved"): 1.0, ("m", "eu", "spot"): 2.0, ("m", "us", ""): 1.0}
    samples = metric_samples(metrics.render().decode())
    assert {tuple(sorted(labels)) for labels, _ in samples["sloproxy_region_held_requests"]} == {("model", "region")}
    # a retag (reload) starts new series and keeps the old ones: counters never go back
    eu_2 = p.backends[1]
    eu_2.config = msgspec.structs.replace(eu_2.config, pool="spot")
    scheduler.replace_regions(router(p, preference=["eu", "us"]))
    assert dispatched() == {("m", "eu", "reserved"): 1.0, ("m", "eu", "spot"): 2.0, ("m", "us", ""): 1.0}
    r = request()
    r.regions = ("eu",)
    scheduler.release(r, await scheduler.acquire(r))
    assert dispatched()[("m", "eu", "spot")] == 3.0
    await scheduler.stop()


async def test_queued_and_held_work_time_out_the_same_way():
    p = pool()
    scheduler = Scheduler(load_policy("fcfs"), p, SchedulingConfig(budget_initial=1, queue_timeout_s=0.2))
    scheduler.regions = router(p)
    scheduler.start()
    try:
        set_kv(p, eu_1=0.8, eu_2=0.8, us_1=0.8, ap_1=0.8)  # over both thresholds
        running = [request(), request()]
        backends = [await scheduler.acquire(r) for r in running]  # eu (all tie: the first) is at its budgets
        assert {b.name for b in backends} == {"eu-1", "eu-2"}
        errors = []
        for slo in ("interactive", "batch"):  # one waits in the queue, one in the hold-back queue
            with pytest.raises(ProxyError) as caught:
                await asyncio.wait_for(scheduler.acquire(request(slo)), 3)
            errors.append(caught.value)
        queued, held = errors
        assert (queued.status, queued.code) == (503, "queue_timeout")  # not sheddable
        assert (held.status, held.code) == (429, "queue_timeout")  # sheddable
        assert queued.message == "The request waited 0.2s in the queue for model `m`."
        assert held.message == "The request waited 0.2s in the hold-back queue for model `m`."
        assert queued.headers == held.headers == {"Retry-After": str(scheduler.config.retry_after_s)}
        assert scheduler.counts["queue_timeout"] == 2 and scheduler.regions.held_count == 0
        for r, b in zip(running, backends, strict=True):
            scheduler.release(r, b)
    finally:
        await scheduler.stop()


async def test_one_region_choice_per_scheduling_decision():
    p = pool()
    scheduler = Scheduler(load_policy("fcfs"), p, SchedulingConfig(budget_initial=1, queue_timeout_s=5))
    regions = scheduler.regions = router(p, preference=["eu", "us"])
    calls = []
    choose = regions._choose

    def counted(*args):
        calls.append(args[0])
        return choose(*args)

    regions._choose = counted
    set_kv(p, eu_1=0.1, eu_2=0.1, us_1=0.1, ap_1=0.1)
    first = [request(), request()]
    placed = []
    for r in first:  # placed on arrival: one choice each (acquire's candidates are what _place gets)
        placed.append(await scheduler.acquire(r))
    assert len(calls) == 2 and {b.name for b in placed} == {"eu-1", "eu-2"}
    waiting = request()
    task = asyncio.ensure_future(scheduler.acquire(waiting))  # eu is at its budgets: it waits
    await asyncio.sleep(0)
    assert len(calls) == 4  # the arrival decision, and the dispatch attempt once it joined the queue
    scheduler.release(first[0], placed[0])  # one dispatch attempt: one choice
    assert len(calls) == 5 and (await task).name == placed[0].name
    scheduler.release(waiting, placed[0])
    scheduler.release(first[1], placed[1])
    await scheduler.stop()
