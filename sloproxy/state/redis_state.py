"""Several proxy replicas, one fleet: scheduler state shared through Redis by leased shares.

Each replica keeps its own queues and dispatches on its own; what is global is *admission*. Every
backend's dispatch budget (slots) is split into shares, one per live replica, and a replica
dispatches only while its local in-flight count is below its share. The hot path reads numbers
kept in this object and never waits for Redis; a background loop exchanges them with Redis every
``sync_interval_s`` in one round trip (one EVALSHA of :data:`~.redis_scripts.SYNC`).

**The share rule** (per backend, computed in Redis for the replica that syncs, ``i``):

* ``B`` = the budget view of the live replica with the smallest id that has set one (none: 0):
  one controller for the fleet (the smallest of the views followed the most pessimistic replica's
  readings). A replica's share never exceeds its own view either.
* target: with ``n`` live replicas serving the backend, each gets 1 slot if ``B >= n``, and the
  other ``B - n`` (all ``B`` if ``B < n``) are split in proportion to ``demand + 1``, largest
  remainder first, ties by replica id. Targets of one run sum to exactly ``B``; the ``+ 1`` keeps
  a small share at an idle replica, so its first request does not wait for a sync.
* ``held_j = max(share_j, prev_j, in_flight_j)`` for every other live replica ``j``, where
  ``prev_j`` is the share ``j`` was using when it sent its last sync.
* ``share_i = min(target_i, max(0, B - sum_j held_j))``; during an epoch freeze also ``<= prev_i``.

**Invariant**: the sum over live replicas of what they may hold never exceeds ``B``. A replica's
real holding is at most its recorded ``held``: between a sync's send and its reply it may
dispatch up to ``prev`` (its old share), afterwards up to its new share, and its in-flight count
grows only while below the share in force. A sync replaces ``held_i`` by ``max(share_i, prev_i,
in_flight_i)``: ``prev_i`` and ``in_flight_i`` are bounded by the old ``held_i``, and ``share_i``
comes only out of capacity no other replica holds, so the sum stays ``<= B`` (for a fixed ``B``;
when ``B`` falls, shares shrink and the fleet drains down to it). Because ``prev`` counts, a
shrinking replica releases capacity to the others one sync later (it asks for that sync at once, so
it comes a quarter interval later).

**Leases**: each sync renews the replica's entry in a sorted set scored by lease expiry (Redis
time). Any sync first removes expired replicas and their records: a killed replica's capacity
returns within ``lease_s``; :meth:`RedisCoordinator.stop` returns it at once.

**Epoch**: if Redis lost its data (restart without persistence, failover to an empty replica) the
epoch key is gone; the next sync creates it. For one lease from then, no share may grow beyond the
``prev`` its replica reports, and replicas that have not synced yet keep theirs: nobody overshoots
while the fleet re-registers (every live replica syncs within a lease, as the backoff is capped
below it). The price: a fleet starting on an empty Redis dispatches nothing for its first lease,
since Redis cannot tell a new fleet from a restarted Redis.

**Degraded mode**: a failed or slow sync (timeout ``min(max(0.2, 4 * sync_interval_s), lease_s /
2)``) marks the replica degraded. It keeps its last shares (never more), so the budget still holds
for replicas that stay alive; one that never synced uses ``budget // last known live replicas``
(1 at start: a fleet starting without Redis can overshoot by up to its replica count). Caveat: a
replica cut off from Redis while others still reach it is expired after a lease and its capacity
given away while it keeps dispatching: Redis being down for everyone is safe, a partition is not.
Retries back off up to ``min(1 s, lease_s / 4)``; tenant increments accumulate and are flushed on
rejoin.

Keys (all under ``{namespace}:`` so they share one Redis Cluster slot; TTLs renewed by every
sync, so nothing outlives the fleet): ``replicas`` (zset), ``records``, ``queues`` and
``tenant_seq`` (hashes, one field per replica), TTL ``max(10 * lease_s, 60 s)``; ``tenants``
(hash) and ``epoch``, TTL one day; ``rate:<key>`` (two windows), ``leader:<role>`` (one lease),
``predictor:version``, ``predictor:versions`` and ``predictor:<version>`` (seven days). Redis should
run with ``maxmemory-policy noeviction``: an evicted epoch key would look like a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: redis 8.2 warns on (and converts) the sync one
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..config import StateConfig
from . import redis_scripts as scripts

log = logging.getLogger("sloproxy.state")

FAILURES = (RedisError, OSError, TimeoutError, msgspec.DecodeError)
LONG_TTL_MS = 24 * 3600 * 1000
PREDICTOR_TTL_MS = 7 * 24 * 3600 * 1000
PREDICTOR_VERSIONS_KEPT = 2


class _Backend:
    """This replica's numbers for one backend, and what the last sync said about the others."""

    __slots__ = ("budget", "demand", "in_flight", "kv_tokens", "remote_in_flight", "remote_kv_tokens", "share")

    def __init__(self) -> None:
        self.in_flight = 0
        self.kv_tokens = 0
        self.demand = 0
        self.budget: int | None = None
        self.share: int | None = None  # None: never granted by Redis
        self.remote_in_flight = 0
        self.remote_kv_tokens = 0


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisCoordinator:
    """One replica's side of the shared state (module docstring: the rule, leases, degraded mode)."""

    def __init__(
        self, config: StateConfig, backends: Sequence[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not config.url:
            raise ValueError("state.url is required with state.backend: redis")
        self.config = config
        self.replica_id = config.replica_id or default_replica_id()
        self.degraded = True  # until a first successful sync
        self.on_change: Callable[[], None] | None = None
        self.before_sync: Callable[[], None] | None = None  # push fresh local numbers (update_local) now
        self.after_sync: Callable[[], None] | None = None  # a sync succeeded: shares and remote numbers are new
        self._clock = clock
        self._backends = {name: _Backend() for name in backends}
        prefix = "{" + config.namespace + "}:"
        self._prefix = prefix
        self._sync_keys = [prefix + k for k in ("replicas", "records", "queues", "tenants", "tenant_seq", "epoch")]
        self._lease_ms = max(1, round(config.lease_s * 1000))
        self._state_ttl_ms = max(10 * self._lease_ms, 60_000)
        self.timeout_s = min(max(0.2, 4 * config.sync_interval_s), max(0.05, config.lease_s / 2))
        self._backoff_cap = min(1.0, config.lease_s / 4)
        self._redis = self._client(self.timeout_s)
        self._bulk = self._client(max(10.0, self.timeout_s))  # predictor files: megabytes, not milliseconds
        # queues and tenants
        self._queues: Counter[tuple[str, str]] = Counter()
        self._queues_dirty = True
        self._remote_queues: dict[tuple[str, str], int] = {}
        self._tenant_synced: dict[str, int] = {}
        self._tenant_pending: Counter[str] = Counter()
        self._tenant_batch: tuple[int, dict[str, int]] | None = None  # sent, not yet acknowledged
        self._tenant_seq = 0
        self._watched: dict[str, None] = {}  # tenants whose global total this replica reads
        # sync loop
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._attempted = False
        self._in_outage = False
        self._outage_since = 0.0
        self._failing = False
        self._last_sync_at = -1e9
        self._live = 1
        self._frozen = False
        self._leading: set[str] = set()
        self._stats = {"syncs": 0, "sync_failures": 0, "round_trips": 0, "last_sync_ms": 0.0}

    def _client(self, timeout: float) -> aioredis.Redis:
        # No client-side retries: the sync loop is the retry, and a retry would hide an outage.
        return aioredis.Redis.from_url(
            self.config.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    # ----- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """First sync (Redis down: degraded, not an error), then the background loop."""
        await self.sync_now()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"state-sync-{self.replica_id}")

    async def stop(self) -> None:
        """Leave the fleet: flush tenant counts and delete this replica's records, so its capacity
        returns at once. Call it once this replica's requests have finished (they stop counting)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(*FAILURES):
            async with self._lock, asyncio.timeout(self.timeout_s * 2):
                batches = self._tenant_batches(seal_always=True)
                message: dict[str, Any] = {"leave": 1}
                if batches:
                    message["t"] = batches
                await self._eval(scripts.SYNC, self._sync_keys, self._sync_args(message, ""))
                for role in list(self._leading):
                    await self._eval(scripts.RESIGN, [self._key("leader:" + role)], [self.replica_id])
        self._leading.clear()
        await self._redis.aclose()
        await self._bulk.aclose()

    # ----- hot path: no I/O ----------------------------------------------------------------------------
    def _backend(self, name: str) -> _Backend:
        backend = self._backends.get(name)
        if backend is None:
            backend = self._backends[name] = _Backend()
        return backend

    def update_local(self, backend: str, in_flight: int, kv_tokens: int, demand: int) -> None:
        """This replica's latest numbers; ``demand`` = in flight + waiting here and servable by it."""
        b = self._backend(backend)
        b.in_flight, b.kv_tokens, b.demand = in_flight, kv_tokens, max(demand, 0)

    def set_budget(self, backend: str, budget: int) -> None:
        self._backend(backend).budget = max(budget, 0)

    def share(self, backend: str) -> int:
        """Slots this replica may hold on ``backend``: dispatch only while in flight < share."""
        b = self._backends.get(backend)
        if b is None:
            return 0
        if b.share is not None:
            share = b.share
        elif self._attempted and b.budget is not None:
            share = b.budget // max(1, self._live)  # never synced: an even split of the last known fleet
        else:
            share = 0
        return share if b.budget is None else min(share, b.budget)

    def remote_in_flight(self, backend: str) -> int:
        b = self._backends.get(backend)
        return b.remote_in_flight if b else 0

    def remote_kv_tokens(self, backend: str) -> int:
        b = self._backends.get(backend)
        return b.remote_kv_tokens if b else 0

    def queue_changed(self, model: str, slo_class: str, delta: int) -> None:
        key = (model, slo_class)
        self._queues[key] += delta
        if not self._queues[key]:
            del self._queues[key]
        self._queues_dirty = True

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """Waiting requests by (model, class): this replica now plus the others as of the last sync."""
        depths = dict(self._remote_queues)
        for key, n in self._queues.items():
            depths[key] = depths.get(key, 0) + n
        return depths

    def remote_queue_depths(self) -> dict[tuple[str, str], int]:
        """Waiting requests by (model, class) at the other replicas, as of the last sync."""
        return self._remote_queues

    def add_tenant_tokens(self, tenant: str, tokens: int) -> int:
        self._tenant_pending[tenant] += tokens
        return self.tenant_tokens(tenant)

    def tenant_tokens(self, tenant: str) -> int:
        """The global total as best known: last synced total plus this replica's unsynced tokens."""
        self._watched[tenant] = None
        total = self._tenant_synced.get(tenant, 0) + self._tenant_pending.get(tenant, 0)
        if self._tenant_batch is not None:
            total += self._tenant_batch[1].get(tenant, 0)
        return total

    def request_sync(self) -> None:
        """Ask for an early sync (coalesced; ignored while Redis is failing: the backoff rules)."""
        if not self._failing:
            self._wake.set()

    def metrics(self) -> dict[str, float]:
        return {
            **self._stats,
            "degraded": float(self.degraded),
            "live_replicas": float(self._live),
            "epoch_frozen": float(self._frozen),
        }

    # ----- the sync ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        # A timer sets the wake event rather than asyncio.timeout around the wait: on Python 3.11 a
        # cancel landing as a timeout expires becomes a TimeoutError and is lost, and stop() would
        # wait forever. The flag covers the same loss inside a sync.
        interval = self.config.sync_interval_s
        min_gap = interval / 4
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping:
            delay = min(self._backoff_cap, interval * 2**failures) if failures else interval
            timer = loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            gap = self._last_sync_at + min_gap - loop.time()  # woken early by request_sync: not too early
            if gap > 0 and not self._stopping:
                await asyncio.sleep(gap)
            if self._stopping:
                return
            self._wake.clear()
            self._last_sync_at = loop.time()
            try:
                ok = await self.sync_now()
            except Exception:  # a bug must not end the loop: every replica would freeze its shares
                log.exception("state: sync failed unexpectedly")
                ok = False
            failures = 0 if ok else min(failures + 1, 30)

    async def sync_now(self) -> bool:
        """One exchange with Redis (the loop calls it; tests and benchmarks may too). True if it worked."""
        async with self._lock:
            before = [self.share(name) for name in self._backends]
            ok = await self._sync()
            self._attempted = True
            after = [self.share(name) for name in self._backends]
            if ok and any(a < b for a, b in zip(after, before, strict=True)):
                # Redis counts the old share as held until the next sync says it is in force no
                # more: say so a quarter interval from now, not a whole one, so what this replica
                # gave up reaches the replica that asked for it sooner.
                self.request_sync()
            if after != before and self.on_change is not None:
                try:
                    self.on_change()
                except Exception:
                    log.exception("state: on_change callback failed")
            return ok

    def _tenant_batches(self, seal_always: bool = False) -> list[list[Any]]:
        """Unacknowledged increments, numbered so a retried batch is applied once. A new batch is
        sealed only once the previous one is acknowledged (or when leaving: both go together)."""
        batches = [] if self._tenant_batch is None else [list(self._tenant_batch)]
        if self._tenant_pending and (self._tenant_batch is None or seal_always):
            self._tenant_seq += 1
            sealed = (self._tenant_seq, dict(self._tenant_pending))
            self._tenant_pending.clear()
            batches.append(list(sealed))
            if self._tenant_batch is None:
                self._tenant_batch = sealed
        return batches

    def _sync_args(self, message: dict[str, Any], queues: str) -> list[Any]:
        return [
            self.replica_id,
            self._lease_ms,
            msgspec.json.encode(message),
            self._state_ttl_ms,
            LONG_TTL_MS,
            queues,
        ]

    async def _sync(self) -> bool:
        if self.before_sync is not None:
            self.before_sync()
        backends = {
            name: [b.in_flight, b.kv_tokens, b.demand, -1 if b.budget is None else b.budget, self.share(name)]
            for name, b in self._backends.items()
        }
        message: dict[str, Any] = {"b": backends}
        batches = self._tenant_batches()
        if batches:
            message["t"] = batches
        watched = list(self._watched)
        if watched:
            message["w"] = watched
        queues_sent = self._queues_dirty
        queues = msgspec.json.encode([[m, c, n] for (m, c), n in self._queues.items()]).decode() if queues_sent else ""
        self._queues_dirty = False
        started = self._clock()
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._eval(scripts.SYNC, self._sync_keys, self._sync_args(message, queues))
            reply = msgspec.json.decode(raw)
        except FAILURES as error:
            self._queues_dirty = self._queues_dirty or queues_sent
            self._failed(error)
            return False
        self._stats["last_sync_ms"] = (self._clock() - started) * 1000
        self._stats["syncs"] += 1
        self._apply(reply, watched)
        if reply.get("j") and not queues_sent:
            self._queues_dirty = True  # Redis did not know this replica: it lost our queue depths
        self._succeeded()
        if self.after_sync is not None:
            try:
                self.after_sync()
            except Exception:
                log.exception("state: after_sync callback failed")
        return True

    def _apply(self, reply: dict[str, Any], watched: list[str]) -> None:
        for name, share in reply.get("s", {}).items():
            if name in self._backends:
                self._backends[name].share = int(share)
        for name, (in_flight, kv_tokens) in reply.get("r", {}).items():
            if name in self._backends:
                b = self._backends[name]
                b.remote_in_flight, b.remote_kv_tokens = int(in_flight), int(kv_tokens)
        queues = reply.get("q") or ()  # an empty Lua table comes back as {}
        self._remote_queues = {(m, c): int(n) for m, c, n in queues if n}
        totals = reply.get("t") or ()
        for tenant, total in zip(watched, totals, strict=False):
            self._tenant_synced[tenant] = int(total) if total else 0
        self._tenant_batch = None
        self._live = max(1, int(reply.get("n", 1)))
        self._frozen = bool(reply.get("f"))

    def _failed(self, error: BaseException) -> None:
        self._stats["sync_failures"] += 1
        self._failing = True
        self.degraded = True
        if not self._in_outage:
            self._in_outage = True
            self._outage_since = self._clock()
            log.warning(
                "state: Redis unreachable (%s: %s): degraded, dispatching within the last known shares",
                type(error).__name__,
                error,
            )

    def _succeeded(self) -> None:
        if self._in_outage:
            log.warning("state: Redis reachable again after %.1f s: shares synced", self._clock() - self._outage_since)
        self._in_outage = self._failing = self.degraded = False

    async def _eval(self, script: str, keys: list[str], args: list[Any], client: aioredis.Redis | None = None) -> Any:
        """EVALSHA, falling back to EVAL (which caches the script) once after a Redis restart."""
        client = client or self._redis
        self._stats["round_trips"] += 1
        try:
            return await client.evalsha(scripts.sha1(script), len(keys), *keys, *args)
        except NoScriptError:
            self._stats["round_trips"] += 1
            return await client.eval(script, len(keys), *keys, *args)

    def _key(self, suffix: str) -> str:
        return self._prefix + suffix

    # ----- rare, async ---------------------------------------------------------------------------------
    async def take_rate(self, key: str, limit: int, window_s: float, cost: int = 1) -> tuple[bool, float]:
        """A fleet-wide sliding-window limiter (tenants' rpm/tpm): (allowed, retry after s).
        Degraded or failing: allowed, so losing Redis never refuses requests."""
        if self.degraded:
            return True, 0.0
        try:
            async with asyncio.timeout(self.timeout_s):
                allowed, wait_ms = await self._eval(
                    scripts.RATE, [self._key("rate:" + key)], [limit, max(1, round(window_s * 1000)), cost]
                )
        except FAILURES:
            return True, 0.0
        return bool(allowed), int(wait_ms) / 1000

    async def charge_rate(self, key: str, window_s: float, cost: int) -> None:
        """Correct a :meth:`take_rate` limiter by ``cost`` (negative: refund), whatever its limit.
        Best effort: a lost correction only shifts one tenant's window, so failures are ignored."""
        if self.degraded or cost == 0:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._eval(scripts.CHARGE, [self._key("rate:" + key)], [max(1, round(window_s * 1000)), cost])
        except FAILURES:
            return

    async def try_lead(self, role: str) -> bool:
        """Take or renew the lease on ``role`` for ``lease_s``; call again well within it. False if
        another replica holds it or Redis is unreachable (no leader beats two)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                leads = await self._eval(scripts.LEAD, [self._key("leader:" + role)], [self.replica_id, self._lease_ms])
        except FAILURES:
            leads = 0
        if leads:
            self._leading.add(role)
        else:
            self._leading.discard(role)
        return bool(leads)

    async def publish_predictor(self, version: str, files: dict[str, bytes]) -> None:
        """Store a predictor version for the other replicas (the newest two are kept). Raises on
        Redis errors, so the publisher can retry."""
        if not files:
            raise ValueError("a predictor version needs at least one file")
        key, versions = self._key("predictor:" + version), self._key("predictor:versions")
        self._stats["round_trips"] += 1
        async with self._bulk.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=files)  # type: ignore[arg-type]
            pipe.pexpire(key, PREDICTOR_TTL_MS)
            pipe.lrem(versions, 0, version)
            pipe.lpush(versions, version)
            pipe.pexpire(versions, PREDICTOR_TTL_MS)
            pipe.set(self._key("predictor:version"), version, px=PREDICTOR_TTL_MS)
            pipe.lrange(versions, PREDICTOR_VERSIONS_KEPT, -1)
            pipe.ltrim(versions, 0, PREDICTOR_VERSIONS_KEPT - 1)
            results = await pipe.execute()
        stale = [self._key("predictor:" + v.decode()) for v in results[7]]
        if stale:
            self._stats["round_trips"] += 1
            await self._bulk.delete(*stale)

    async def fetch_predictor(self, known_version: str | None) -> tuple[str, dict[str, bytes]] | None:
        """The published version and its files if it differs from ``known_version``; else (or if
        Redis is unreachable) None."""
        try:
            self._stats["round_trips"] += 1
            raw = await self._bulk.get(self._key("predictor:version"))
            if raw is None or raw.decode() == known_version:
                return None
            version = raw.decode()
            self._stats["round_trips"] += 1
            files = await self._bulk.hgetall(self._key("predictor:" + version))
        except FAILURES:
            return None
        if not files:
            return None
        return version, {name.decode(): data for name, data in files.items()}
