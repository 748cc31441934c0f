"""Scheduling decision cost with 10,000 waiting requests and 64 backends. Target: median <= 20 us.

Two measurements:

* **live** — the real :class:`~sloproxy.scheduler.Scheduler`. With 10,000 requests waiting the
  fleet is saturated (every backend at its budget: otherwise the dispatch loop would already have
  sent them), so each decision is what happens when a request finishes: ``release`` frees a slot,
  ``dispatch`` picks the next request and its backend (queue pop, admission, routing, the
  reservation in the state ledger). Timed: ``release`` + ``dispatch``.
* **policy, all backends admit** — the policy alone when every one of the 64 backends could take
  the request (peek, admission over 64, scoring over 64, pop): the worst case for the parts.

Policies: fcfs, edf, priority-fair and the default ``slo`` (EDF with KV reservation admission: every
load reports a KV capacity of 1M tokens, so its admission reads each backend's reservations, and
least-load with length affinity scores every backend that admits).

    .venv/bin/python bench/scheduler_decision.py [--waiting 10000] [--backends 64]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from types import SimpleNamespace

from sloproxy.backends import BackendPool
from sloproxy.config import BackendConfig, HealthConfig, LoadPolling
from sloproxy.plugins import load_policy
from sloproxy.policies.base import Snapshot
from sloproxy.request import ProxyRequest
from sloproxy.scheduler import Scheduler
from sloproxy.scheduler_config import SchedulingConfig
from sloproxy.slo import DEFAULT_CLASSES


def request(index: int, rng: random.Random) -> ProxyRequest:
    r = ProxyRequest(id=f"r{index}", kind="chat", model="m", stream=False, include_usage=False, body={}, raw=b"")
    r.classify(f"t{rng.randrange(20)}", DEFAULT_CLASSES[rng.randrange(2)])
    r.priority = rng.randrange(-2, 3)
    r.urgent_deadline = index * 0.001 + rng.uniform(0, 60)
    r.est_prompt_tokens, r.est_output_tokens = rng.randrange(50, 4000), rng.randrange(10, 1000)
    return r


async def live(policy_name: str, waiting: int, backends_count: int, decisions: int) -> list[float]:
    rng = random.Random(1)
    configs = [
        BackendConfig(name=f"b{i}", engine="vllm", url="http://127.0.0.1:9", models=["m"])
        for i in range(backends_count)
    ]
    pool = BackendPool(configs, HealthConfig(), LoadPolling())
    scheduler = Scheduler(
        load_policy(policy_name, {"reserve": 0.0}),  # no band reserve: one decision per freed slot
        pool,
        SchedulingConfig(budget_initial=16, max_queue=waiting * 4, max_queue_bytes=1 << 40),
    )
    for backend in pool.backends:
        backend.load = SimpleNamespace(
            running=16, waiting=0, kv_usage=rng.random() * 0.8, kv_capacity_tokens=1_000_000, preemptions=None
        )
        backend.load_read_at = time.monotonic() + 3600  # fresh for the whole run
    loop = asyncio.get_running_loop()
    running: list[tuple[ProxyRequest, object]] = []
    queue = scheduler.queues.setdefault("m", scheduler.policy.ordering())

    def enqueue(r: ProxyRequest) -> None:  # what acquire() does, without awaiting
        future = loop.create_future()
        future.add_done_callback(lambda f, r=r: running.append((r, f.result())) if not f.cancelled() else None)
        scheduler._waiters[id(r)] = future
        queue.push(r)

    for i in range(backends_count * 16 + waiting):
        enqueue(request(i, rng))
    scheduler.dispatch("m")  # fills every budget: the queue keeps `waiting`
    await asyncio.sleep(0)
    samples = []
    clock = time.perf_counter
    for i in range(decisions):
        finished, backend = running.pop(rng.randrange(len(running)))
        enqueue(request(backends_count * 16 + waiting + i, rng))
        start = clock()
        scheduler.release(finished, backend)  # a request finished: one slot frees, one decision follows
        samples.append(clock() - start)
        await asyncio.sleep(0)  # let the dispatched waiter's callback run
        assert len(queue) == waiting
    return samples


def policy_only(policy_name: str, waiting: int, backends_count: int, decisions: int) -> list[float]:
    rng = random.Random(1)
    policy = load_policy(policy_name)
    backends = [
        SimpleNamespace(
            name=f"b{i}",
            models=frozenset({"m"}),
            healthy=True,
            in_flight=rng.randrange(0, 8),
            budget=1_000_000,
            urgent_budget=1_000_000,
            priority_scheduling=False,
            load=SimpleNamespace(running=4, waiting=0, kv_usage=rng.random() * 0.8, kv_capacity_tokens=1_000_000),
            load_is_stale=False,
            kv_reserved_tokens=0,  # the KV-reserving policies (slo) admit against the capacity above
            kv_urgent_tokens=0,
        )
        for i in range(backends_count)
    ]
    queue = policy.ordering()
    for i in range(waiting):
        queue.push(request(i, rng))
    samples = []
    clock = time.perf_counter
    for i in range(decisions):
        queue.push(request(waiting + i, rng))
        start = clock()
        snapshot = Snapshot(0.0, backends)
        head = queue.peek()
        chosen = policy.route(head, policy.admitting(head, backends, snapshot), snapshot)
        queue.pop()
        chosen.in_flight += 1
        samples.append(clock() - start)
        if chosen.in_flight > 12:
            chosen.in_flight = 0
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--backends", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{args.waiting} waiting, {args.backends} backends; microseconds per decision")
    print(f"{'policy':14} {'live median':>12} {'live p99':>9} {'all-admit median':>17} {'all-admit p99':>14}")
    ok = True
    for name in ("fcfs", "edf", "priority-fair", "slo"):
        live_samples = sorted(asyncio.run(live(name, args.waiting, args.backends, args.decisions)))
        worst = sorted(policy_only(name, args.waiting, args.backends, args.decisions))
        median = statistics.median(live_samples) * 1e6
        ok &= median <= 20.0
        print(
            f"{name:14} {median:12.2f} {live_samples[int(len(live_samples) * 0.99)] * 1e6:9.2f} "
            f"{statistics.median(worst) * 1e6:17.2f} {worst[int(len(worst) * 0.99)] * 1e6:14.2f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
