"""Redis shared state: what one sync costs, with 1, 2 and 3 coordinators (replicas) on one Redis.

    .venv/bin/python bench/redis_state.py [--url redis://host:port/0] [--backends 8] [--seconds 2]

Without ``--url`` a private redis-server is started on a free port (tests/redis_server.py). All
coordinators run in this one process, so its event loop is shared as it would not be in a fleet.
Per fleet size, two runs:

* **paced**: every coordinator syncs every ``--interval`` (0.05 s, the default of
  ``state.sync_interval_s``): the round trip a replica pays in production.
* **closed**: every coordinator syncs back to back: the sync rate one process and Redis sustain.

Each sync carries ``--backends`` backends' numbers, a changed queue depth and a few tenants'
increments, as a busy replica's would. ``client us/sync`` is this process's CPU time per sync (what
the proxy's own event loop pays), not Redis's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.redis_server

from sloproxy.config import StateConfig
from sloproxy.state.redis_state import RedisCoordinator
from tests.redis_server import RedisServer


def coordinators(url: str, count: int, backends: int, run: str) -> list[RedisCoordinator]:
    names = [f"b{i}" for i in range(backends)]
    members = []
    for i in range(count):
        # the loop stays idle (interval of an hour); the benchmark calls sync_now itself
        config = StateConfig(
            backend="redis", url=url, namespace=f"bench-{run}", replica_id=f"r{i}", lease_s=5.0, sync_interval_s=3600
        )
        c = RedisCoordinator(config, names)
        for name in names:
            c.set_budget(name, 64)
        members.append(c)
    return members


def busy(c: RedisCoordinator, tick: int) -> None:
    """Numbers change between syncs as on a busy replica: every backend, one queue, three tenants."""
    for k, name in enumerate(c._backends):
        in_flight = (tick + k) % 9
        c.update_local(name, in_flight=in_flight, kv_tokens=in_flight * 1500, demand=in_flight + tick % 4)
    c.queue_changed("llama-3-8b", "interactive", 1 if tick % 2 else -1)
    for tenant in ("acme", "globex", "initech"):
        c.add_tenant_tokens(tenant, 200)


async def measure(url: str, count: int, backends: int, seconds: float, interval: float | None) -> dict[str, float]:
    members = coordinators(url, count, backends, f"{count}-{'paced' if interval else 'closed'}")
    for c in members:
        await c.start()
    latencies: list[float] = []

    async def drive(c: RedisCoordinator) -> None:
        tick = 0
        deadline = time.perf_counter() + seconds
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            busy(c, tick)
            started = time.perf_counter()
            assert await c.sync_now(), "a sync failed"
            latencies.append(time.perf_counter() - started)
            tick += 1
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(drive(c) for c in members))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for c in members:
        await c.stop()
    latencies.sort()
    return {
        "syncs_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "client_us": cpu / len(latencies) * 1e6,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis (default: start a private redis-server)")
    parser.add_argument("--backends", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=0.05, help="the paced run's sync interval (s)")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url or stack.enter_context(RedisServer()).url
        print(f"{args.backends} backends, {args.seconds:g} s per run, paced at {args.interval * 1000:g} ms")
        print(f"{'replicas':>8} {'run':>7} {'syncs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'client us/sync':>15}")
        for count in (1, 2, 3):
            for interval in (args.interval, None):
                r = await measure(url, count, args.backends, args.seconds, interval)
                run = "paced" if interval else "closed"
                print(
                    f"{count:>8} {run:>7} {r['syncs_per_s']:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
                    f" {r['client_us']:>15.0f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
