"""Shared state through a real Redis: leased shares, leases, epochs, degraded mode, global counters.

Every test runs coordinators (several "replicas" in one process) against a private redis-server,
each test in its own namespace. Leases are short (0.5 s) so expiry is quick; a fresh namespace
starts with an epoch freeze of one lease (no share grows), which the tests wait out.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
import redis.asyncio as aioredis

from sloproxy.config import StateConfig
from sloproxy.state.redis_state import RedisCoordinator
from tests.redis_server import RedisServer, free_port

LEASE = 0.5
INTERVAL = 0.02


def coordinator(
    url: str,
    namespace: str,
    replica_id: str,
    budget: int | None = 12,
    backends: Iterable[str] = ("b",),
    lease: float = LEASE,
    interval: float = INTERVAL,
) -> RedisCoordinator:
    config = StateConfig(
        backend="redis", url=url, namespace=namespace, replica_id=replica_id, lease_s=lease, sync_interval_s=interval
    )
    backends = list(backends)
    c = RedisCoordinator(config, backends)
    if budget is not None:
        for name in backends:
            c.set_budget(name, budget)
    return c


class Fleet:
    """Coordinators of one namespace; stopped at teardown (whatever state a test left them in)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.members: list[RedisCoordinator] = []

    async def add(self, replica_id: str, start: bool = True, **options) -> RedisCoordinator:
        c = coordinator(self.url, self.namespace, replica_id, **options)
        self.members.append(c)
        if start:
            await c.start()
        return c

    async def close(self) -> None:
        for c in self.members:
            await c.stop()


@pytest.fixture
async def fleet(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[Fleet]:
    f = Fleet(redis_server.url, f"{request.node.name}-{secrets.token_hex(3)}")
    yield f
    await f.close()


async def sync_until(members: list[RedisCoordinator], condition: Callable[[], bool], what: str) -> None:
    """Sync every coordinator in turn until ``condition`` holds (coordinators that sync only when told)."""
    started = time.monotonic()
    while True:
        for c in members:
            assert await c.sync_now()
        if condition():
            return
        assert time.monotonic() - started < 5, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> float:
    """Poll ``condition`` every 10 ms; fail after ``timeout``. Returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def shares(*cs: RedisCoordinator, backend: str = "b") -> tuple[int, ...]:
    return tuple(c.share(backend) for c in cs)


# ----- the share rule --------------------------------------------------------------------------------
async def test_shares_converge_to_demand_proportional_split(fleet: Fleet):
    a, b = await fleet.add("a"), await fleet.add("b")
    changes = []
    a.on_change = lambda: changes.append(a.share("b"))
    await until(lambda: shares(a, b) == (6, 6), "an even split of 12 between two idle replicas")
    assert a.metrics()["live_replicas"] == 2 and changes  # growth out of the epoch freeze was announced

    # 1 slot each, the other 10 by demand + 1 (1 : 10) with the largest remainder to a: (2, 10)
    b.update_local("b", in_flight=0, kv_tokens=0, demand=9)
    await until(lambda: shares(a, b) == (2, 10), "a split by demand")

    # three replicas: 1 each, 9 by (1 : 10 : 1) -> floors 0, 7, 0; the 2 left go to the largest
    # remainders, a and c (tied, a first by id): (2, 8, 2)
    c = await fleet.add("c")
    await until(lambda: shares(a, b, c) == (2, 8, 2), "a three-way split by demand")
    assert sum(shares(a, b, c)) == 12


async def test_a_replica_whose_share_shrank_syncs_again_soon(fleet: Fleet):
    """Redis counts a shrinking replica's old share as held until its next sync: that sync is asked
    for at once (a quarter interval later, not a whole one), so the slots reach the asking replica."""
    a, b = await fleet.add("a", start=False), await fleet.add("b", start=False)
    await sync_until([a, b], lambda: not a.metrics()["epoch_frozen"], "the new epoch's freeze to end")
    await sync_until([a, b], lambda: shares(a, b) == (6, 6), "an even split")
    assert not a._wake.is_set()  # nothing shrank: no early sync asked for
    b.update_local("b", in_flight=0, kv_tokens=0, demand=9)
    assert await b.sync_now() and await a.sync_now()
    assert a.share("b") < 6 and a._wake.is_set()  # a gave up slots: it asked to say so soon
    assert await a.sync_now() and await b.sync_now()
    assert shares(a, b) == (2, 10)  # one more sync each, and b holds what a gave up


async def test_the_fleet_budget_is_the_view_of_the_replica_with_the_smallest_id(fleet: Fleet):
    """One controller for the fleet: with the smallest of three views the fleet followed whichever
    replica's readings were most pessimistic. A replica still never takes more than its own view."""
    a, b = await fleet.add("a", budget=10), await fleet.add("b", budget=4)
    await until(lambda: shares(a, b) == (5, 4), "a's view of 10 split 5 / 5, b held to its own 4")
    a.set_budget("b", 6)
    b.set_budget("b", 20)
    await until(lambda: shares(a, b) == (3, 3), "a's new view of 6, split evenly")
    await a.stop()  # a leaves: b's view is the fleet's
    await until(lambda: b.share("b") == 20, "b alone with its own view of 20")


async def test_random_syncs_never_exceed_budget(fleet: Fleet):
    """Replicas driven as a scheduler would (dispatch only while in flight < share, also while a
    sync is on its way), with random demand, completions, overlapping syncs in random order,
    replicas leaving and joining, and budgets rising phase by phase with views that differ (the
    view of the live replica with the smallest id is the fleet's): after every step the sum of
    max(share, in flight) over replicas stays within that budget."""
    rng = random.Random(7)
    backends = ("x", "y")
    names = iter(f"r{i}" for i in range(100))
    options = {"backends": backends, "budget": None, "lease": 1.0, "interval": 3600.0}  # syncs only on demand
    members = [await fleet.add(next(names), **options) for _ in range(3)]
    in_flight = {id(c): dict.fromkeys(backends, 0) for c in members}
    waiting = {id(c): dict.fromkeys(backends, 0) for c in members}

    def publish(c: RedisCoordinator) -> None:
        for name in backends:
            n = in_flight[id(c)][name]
            c.update_local(name, in_flight=n, kv_tokens=100 * n, demand=n + waiting[id(c)][name])

    def check(budget: int) -> None:
        for name in backends:
            held = sum(max(c.share(name), in_flight[id(c)][name]) for c in members)
            assert held <= budget, f"{name}: replicas hold {held} > budget {budget}"

    syncs = grown = 0
    pending: dict[int, asyncio.Task[bool]] = {}  # at most one sync in flight per replica, as its loop

    async def settle(wait: bool) -> None:
        nonlocal syncs, grown
        for key, task in list(pending.items()):
            if wait or task.done():
                assert await task
                del pending[key]
                syncs += 1
                grown += any(c.share(n) > 1 for c in members for n in backends)

    views: dict[int, int] = {}  # id(replica) -> its budget view (the same for both backends)

    def leader_view() -> int:
        return views[id(min(members, key=lambda c: c.replica_id))]

    for budget in (2, 7, 23):  # fewer slots than replicas, then more
        await settle(wait=True)
        leader = min(members, key=lambda c: c.replica_id)
        for c in members:  # the others see as much or more: a leader leaving never lowers the budget
            views[id(c)] = budget if c is leader else budget + rng.choice((0, 0, 1, 5))
            for name in backends:
                c.set_budget(name, views[id(c)])
        # the phase's views reach Redis, and the epoch freeze of a new namespace passes
        await sync_until(members, lambda: all(c.metrics()["epoch_frozen"] == 0 for c in members), "the epoch")
        check(leader_view())
        for _ in range(500):
            c = rng.choice(members)
            name = rng.choice(backends)
            action = rng.random()
            if action < 0.4 and in_flight[id(c)][name] < c.share(name):  # also while its sync is in flight
                in_flight[id(c)][name] += 1
            elif action < 0.6 and in_flight[id(c)][name] > 0:
                in_flight[id(c)][name] -= 1
            elif action < 0.7:
                waiting[id(c)][name] = rng.choice((0, 0, 1, 3, 10, 40))
            elif action < 0.99:
                if id(c) not in pending:
                    publish(c)
                    pending[id(c)] = asyncio.create_task(c.sync_now())
            elif id(c) not in pending and all(n == 0 for n in in_flight[id(c)].values()):  # leave, then a newcomer
                members.remove(c)
                await c.stop()
                newcomer = await fleet.add(next(names), **{**options, "budget": budget})
                views[id(newcomer)] = budget
                in_flight[id(newcomer)] = dict.fromkeys(backends, 0)
                waiting[id(newcomer)] = dict.fromkeys(backends, 0)
                members.append(newcomer)
            await asyncio.sleep(rng.choice((0, 0, 0.0003)))  # let some replies arrive, others not yet
            await settle(wait=False)
            check(leader_view())
    await settle(wait=True)
    check(leader_view())
    assert syncs > 300 and grown > 100  # the run exercised syncs and real shares, not a frozen fleet


async def test_budget_decrease_admits_nothing_until_drained(fleet: Fleet):
    a, b = await fleet.add("a", budget=10), await fleet.add("b", budget=10)
    await until(lambda: shares(a, b) == (5, 5), "an even split of 10")
    in_flight = {"a": 5, "b": 5}
    members = {"a": a, "b": b}
    for c in members.values():
        c.update_local("b", in_flight=5, kv_tokens=0, demand=8)
        c.set_budget("b", 4)

    def admissible() -> int:  # requests the fleet could still dispatch
        return sum(max(0, c.share("b") - in_flight[name]) for name, c in members.items())

    for step in range(12):
        name = "ab"[step % 2]
        if step % 3 == 2 and in_flight[name]:
            in_flight[name] -= 1
            members[name].update_local("b", in_flight=in_flight[name], kv_tokens=0, demand=in_flight[name] + 3)
        await members[name].sync_now()
        assert admissible() <= max(0, 4 - sum(in_flight.values())), (step, shares(a, b), in_flight)
    for name, c in members.items():
        in_flight[name] = 0
        c.update_local("b", in_flight=0, kv_tokens=0, demand=0)
    await until(lambda: shares(a, b) == (2, 2), "an even split of the new budget")


# ----- leases ----------------------------------------------------------------------------------------
async def test_killed_replica_capacity_returns_within_lease(fleet: Fleet):
    a, b = await fleet.add("a"), await fleet.add("b")
    await until(lambda: shares(a, b) == (6, 6), "an even split")
    assert b._task is not None
    b._task.cancel()  # SIGKILL, as far as Redis can tell: no more syncs, no goodbye
    took = await until(lambda: a.share("b") == 12, "the dead replica's share to come back", timeout=LEASE + 3)
    assert a.metrics()["live_replicas"] == 1
    assert took >= LEASE * 0.5  # not before its lease could run out


async def test_clean_stop_returns_capacity_at_once(fleet: Fleet):
    a, b = await fleet.add("a"), await fleet.add("b")
    await until(lambda: shares(a, b) == (6, 6), "an even split")
    await b.stop()
    assert await a.sync_now()  # the first sync after b left (a's loop may have synced already)
    assert a.share("b") == 12 and a.metrics()["live_replicas"] == 1


async def test_request_sync_wakes_the_loop(fleet: Fleet):
    a = await fleet.add("a", interval=5.0)
    assert a.metrics()["syncs"] == 1  # the first sync, in start()
    a.request_sync()
    a.request_sync()  # coalesced with the first
    await until(lambda: a.metrics()["syncs"] >= 2, "an early sync", timeout=2.0)
    await asyncio.sleep(0.1)
    assert a.metrics()["syncs"] == 2


# ----- epochs and degraded mode ------------------------------------------------------------------------
async def test_data_loss_freezes_growth_for_one_lease(fleet: Fleet, redis_server: RedisServer):
    a = await fleet.add("a", interval=3600.0, lease=1.0)  # both sync only when told
    b = await fleet.add("b", interval=3600.0, lease=1.0)
    await sync_until([a, b], lambda: a.metrics()["epoch_frozen"] == 0, "the end of the epoch freeze")
    await sync_until([a, b], lambda: shares(a, b) == (6, 6), "an even split")
    client = aioredis.Redis.from_url(redis_server.url)
    keys = await client.keys("{" + fleet.namespace + "}:*")
    await client.delete(*keys)  # Redis lost everything; both replicas still hold 6
    await client.aclose()

    a.update_local("b", in_flight=0, kv_tokens=0, demand=30)
    await a.sync_now()
    assert a.metrics()["epoch_frozen"] == 1
    assert a.share("b") == 6  # alone in Redis with all the demand, yet b may still hold 6
    await b.sync_now()
    assert shares(a, b) == (6, 1)  # b shrinks to its target; a may not grow into it yet
    frozen_syncs = 0
    while True:  # until the freeze ends (one lease), a stays at what it held
        await asyncio.sleep(0.02)
        await a.sync_now()
        if not a.metrics()["epoch_frozen"]:
            break
        frozen_syncs += 1
        assert a.share("b") == 6
        await b.sync_now()
    assert frozen_syncs >= 5
    # then a grows: 1 each, 10 by (31 : 1) -> floors 9 and 0, the slot left to a's larger remainder
    await sync_until([a, b], lambda: shares(a, b) == (11, 1), "a split by demand")


async def test_start_with_redis_down_is_degraded_then_joins(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, "sloproxy.state")
    server = RedisServer(port=free_port())  # not started yet
    c = coordinator(server.url, "down-at-start", "a", budget=10)
    await c.start()
    try:
        assert c.degraded and c.metrics()["sync_failures"] == 1
        assert c.share("b") == 10  # never synced, last known fleet of 1: the whole budget (documented)
        c.update_local("b", in_flight=3, kv_tokens=0, demand=3)
        assert c.add_tenant_tokens("t", 7) == 7
        assert await c.take_rate("t", 1, 1.0) == (True, 0.0)
        assert not await c.try_lead("trainer")
        assert await c.fetch_predictor(None) is None
        server.start()
        await until(lambda: not c.degraded, "joining once Redis is up")
        assert c.share("b") == 10  # the epoch freeze keeps what it held; alone, that is all of it
        await until(lambda: c.tenant_tokens("t") == 7 and c.metrics()["syncs"] >= 3, "the tenant count flushed")
        entering = [r for r in caplog.records if "unreachable" in r.getMessage()]
        rejoining = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(entering) == 1 and len(rejoining) == 1
    finally:
        await c.stop()
        server.kill()


async def test_redis_killed_then_restarted_keeps_budget(caplog: pytest.LogCaptureFixture):
    """Two replicas saturate a backend of 10 slots; Redis is SIGKILLed (both freeze their shares,
    the hot path keeps working), then restarted empty while b still has 5 requests in flight and a
    suddenly wants everything: the epoch freeze keeps a at 5 until b has drained and re-registered.
    A checker after every simulated scheduler step asserts sum(max(share, in flight)) <= 10."""
    caplog.set_level(logging.WARNING, "sloproxy.state")
    with RedisServer() as server:
        a, b = coordinator(server.url, "restart", "a", budget=10), coordinator(server.url, "restart", "b", budget=10)
        members = {"a": a, "b": b}
        in_flight = {"a": 0, "b": 0}
        backlog = {"a": 20, "b": 20}
        violations: list[str] = []
        frozen_changes: list[str] = []
        frozen: dict[str, int] = {}
        rng = random.Random(3)

        def step() -> None:
            for name, c in members.items():
                in_flight[name] -= sum(rng.random() < 0.04 for _ in range(in_flight[name]))
                while in_flight[name] < c.share("b") and backlog[name] > 0:
                    in_flight[name] += 1
                c.update_local("b", in_flight=in_flight[name], kv_tokens=0, demand=in_flight[name] + backlog[name])
                if not c.degraded:  # each outage freezes the share it began with (a load hiccup is one too)
                    frozen.pop(name, None)
                elif frozen.setdefault(name, c.share("b")) != c.share("b"):
                    frozen_changes.append(f"{name}: {frozen[name]} -> {c.share('b')}")
            held = sum(max(c.share("b"), in_flight[n]) for n, c in members.items())
            if held > 10:
                violations.append(f"held {held}: shares {shares(a, b)}, in flight {in_flight}")

        async def drive() -> None:
            while True:
                step()
                await asyncio.sleep(0.003)

        await a.start()
        await b.start()
        driver = asyncio.create_task(drive())
        try:
            await until(lambda: in_flight == {"a": 5, "b": 5}, "both replicas saturated at 5")
            server.kill()
            await until(lambda: a.degraded and b.degraded, "both replicas degraded")
            await asyncio.sleep(0.2)
            assert shares(a, b) == (5, 5)
            a.queue_changed("m", "interactive", 2)
            assert a.queue_depths()[("m", "interactive")] == 2
            assert a.add_tenant_tokens("acme", 40) == 40
            assert await a.take_rate("acme", 1, 60.0) == (True, 0.0)

            backlog.update(a=100, b=0)  # b only drains from now on; a wants everything
            server.start()
            await until(lambda: not a.degraded and not b.degraded, "both replicas rejoined")
            await until(lambda: shares(a, b) == (9, 1), "a split by the new demand", timeout=5)
            await until(lambda: b.tenant_tokens("acme") == 40, "a's tenant count from the outage")
            await until(lambda: b.queue_depths().get(("m", "interactive")) == 2, "a's queue depth")
        finally:
            driver.cancel()
            await a.stop()
            await b.stop()
        assert not violations, violations[:5]
        assert not frozen_changes, frozen_changes[:5]
        assert a.metrics()["sync_failures"] >= 1 and b.metrics()["sync_failures"] >= 1
        messages = [r.getMessage() for r in caplog.records]
        # One line per replica entering the outage and one rejoining (more if a loaded machine made a
        # sync time out before the kill: each is a real outage, logged in pairs).
        entering = sum("unreachable" in m for m in messages)
        assert entering >= 2 and sum("reachable again" in m for m in messages) == entering


# ----- global numbers --------------------------------------------------------------------------------
async def test_tenant_counters_queue_depths_and_remote_load_are_global(fleet: Fleet):
    a, b, c = await fleet.add("a"), await fleet.add("b"), await fleet.add("c")
    assert a.add_tenant_tokens("acme", 100) == 100  # unsynced yet: what this replica knows
    b.add_tenant_tokens("acme", 50)
    b.add_tenant_tokens("other", 5)
    await until(lambda: a.tenant_tokens("acme") == b.tenant_tokens("acme") == 150, "global tenant totals")
    await until(lambda: c.tenant_tokens("acme") == 150, "the total at a replica that only reads it")
    assert a.add_tenant_tokens("acme", 1) == 151

    a.queue_changed("m", "interactive", 3)
    b.queue_changed("m", "interactive", 2)
    b.queue_changed("m", "batch", 1)
    b.queue_changed("m", "batch", -1)
    b.queue_changed("n", "batch", 4)
    expected = {("m", "interactive"): 5, ("n", "batch"): 4}
    await until(lambda: a.queue_depths() == b.queue_depths() == c.queue_depths() == expected, "global depths")

    a.update_local("b", in_flight=3, kv_tokens=300, demand=3)
    b.update_local("b", in_flight=1, kv_tokens=50, demand=1)
    await until(lambda: c.remote_in_flight("b") == 4 and c.remote_kv_tokens("b") == 350, "others' load")
    await until(lambda: a.remote_in_flight("b") == 1 and a.remote_kv_tokens("b") == 50, "others' load at a")

    b.update_local("b", in_flight=0, kv_tokens=0, demand=0)
    await b.stop()  # its queue depths leave with it; its tokens were served and stay counted
    await until(lambda: a.queue_depths() == {("m", "interactive"): 3}, "b's depths gone")
    await until(lambda: c.tenant_tokens("other") == 5 and a.tenant_tokens("acme") == 151, "totals kept")


async def test_take_rate_allows_limit_per_window_then_refuses(fleet: Fleet):
    a, b = await fleet.add("a"), await fleet.add("b")
    window = 0.5
    assert [await a.take_rate("acme:rpm", 3, window) for _ in range(2)] == [(True, 0.0)] * 2
    assert await b.take_rate("acme:rpm", 3, window) == (True, 0.0)  # one limiter for the fleet
    allowed, retry_after = await a.take_rate("acme:rpm", 3, window)
    assert not allowed and 0 < retry_after <= 2 * window
    assert (await b.take_rate("acme:rpm", 3, window))[0] is False
    assert await a.take_rate("other:rpm", 3, window) == (True, 0.0)  # keys are independent
    assert await a.take_rate("big", 10, window, cost=11) == (False, window)  # never fits: one window
    await asyncio.sleep(retry_after + 0.02)
    assert (await a.take_rate("acme:rpm", 3, window))[0] is True


async def test_leader_lease_is_exclusive_and_moves(fleet: Fleet):
    a, b = await fleet.add("a", lease=1.0), await fleet.add("b", lease=1.0)
    assert await a.try_lead("predictor-trainer")
    assert not await b.try_lead("predictor-trainer")
    assert await b.try_lead("other-role")  # roles are independent
    await asyncio.sleep(0.6)
    assert await a.try_lead("predictor-trainer")  # renewed
    await asyncio.sleep(0.6)
    assert not await b.try_lead("predictor-trainer")  # still a's: renewed 0.6 s ago, for 1 s
    started = time.monotonic()
    while not await b.try_lead("predictor-trainer"):  # a stopped renewing
        assert time.monotonic() - started < 3, "the lease never moved"
        await asyncio.sleep(0.02)
    assert not await a.try_lead("predictor-trainer")
    await b.stop()  # stepping down hands the role over at once
    assert await a.try_lead("predictor-trainer")


async def test_predictor_publish_fetch_round_trips_bytes(fleet: Fleet, redis_server: RedisServer):
    a, b = await fleet.add("a"), await fleet.add("b")
    assert await b.fetch_predictor(None) is None  # nothing published
    files = {"model.txt": bytes(range(256)) * 8192, "meta.json": b'{"version": 1}'}  # 2 MB of every byte value
    await a.publish_predictor("v1", files)
    assert await b.fetch_predictor(None) == ("v1", files)
    assert await b.fetch_predictor("v1") is None  # already known
    await a.publish_predictor("v2", {"model.txt": b"two"})
    await a.publish_predictor("v3", {"model.txt": b"three"})
    assert await b.fetch_predictor("v1") == ("v3", {"model.txt": b"three"})
    client = aioredis.Redis.from_url(redis_server.url)
    prefix = "{" + fleet.namespace + "}:predictor:"
    kept = [await client.exists(prefix + v) for v in ("v1", "v2", "v3")]
    ttl = await client.pttl(prefix + "v3")
    await client.aclose()
    assert kept == [0, 1, 1]  # the newest two
    assert ttl > 0
    with pytest.raises(ValueError):
        await a.publish_predictor("v4", {})
