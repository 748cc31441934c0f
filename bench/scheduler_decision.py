"""Scheduling decision cost: one dispatch decision with 10,000 waiting requests and 64 backends.

A decision is what the live dispatch loop does per request: peek the queue head, ask the
admission part which backends may take it, route (filters + weighted scorers), pop. The queue
is kept at 10,000 by pushing a new request per decision. Target: median <= 20 us.

    .venv/bin/python bench/scheduler_decision.py [--waiting 10000] [--backends 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from types import SimpleNamespace

from sloproxy.plugins import load_policy
from sloproxy.policies.base import Snapshot
from sloproxy.request import ProxyRequest


def request(index: int, rng: random.Random) -> ProxyRequest:
    r = ProxyRequest(id=f"r{index}", kind="chat", model="m", stream=False, include_usage=False, body={}, raw=b"")
    r.band = rng.choice((0, 1))
    r.tenant = f"t{rng.randrange(20)}"
    r.priority = rng.randrange(-2, 3)
    r.urgent_deadline = index * 0.001 + rng.uniform(0, 60)
    r.est_prompt_tokens, r.est_output_tokens = rng.randrange(50, 4000), rng.randrange(10, 1000)
    return r


def measure(policy_name: str, waiting: int, backends_count: int, decisions: int) -> list[float]:
    rng = random.Random(1)
    policy = load_policy(policy_name)
    backends = [
        SimpleNamespace(
            name=f"b{i}",
            healthy=True,
            in_flight=rng.randrange(0, 8),
            budget=1_000_000,
            load=SimpleNamespace(running=4, waiting=0, kv_usage=rng.random() * 0.8),
            load_is_stale=False,
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
        admitting = policy.admitting(head, backends, snapshot)
        chosen = policy.route(head, admitting, snapshot)
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
    print(f"{'policy':14} {'median us':>10} {'p99 us':>8}   ({args.waiting} waiting, {args.backends} backends)")
    ok = True
    for name in ("fcfs", "edf", "priority-fair"):
        samples = sorted(measure(name, args.waiting, args.backends, args.decisions))
        median = statistics.median(samples) * 1e6
        p99 = samples[int(len(samples) * 0.99)] * 1e6
        ok &= median <= 20.0
        print(f"{name:14} {median:10.2f} {p99:8.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
