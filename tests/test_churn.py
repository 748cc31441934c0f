"""A short churn in the suite (bench/churn.py runs it for minutes): mixed traffic, clients hanging up
mid-stream and faults coming and going on one backend. No request may be lost, no reservation left,
and the proxy's descriptors must come back to where they started."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator

import pytest

from sloproxy.app import Proxy, build_server
from sloproxy.churn import churn
from sloproxy.config import parse_config
from sloproxy.processes import EmulatorProcess

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    with EmulatorProcess([{"name": n, "engine": "vllm", "model": "m"} for n in NAMES], speedup=20.0) as running:
        yield running


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_within(limit: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while (count := open_fds()) > limit and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return count


@pytest.mark.timeout(90)
async def test_short_churn_loses_nothing_and_leaks_nothing(fleet: EmulatorProcess) -> None:
    random.seed(7)
    config = {
        "backends": [{"name": n, "engine": "vllm", "url": fleet.url(n), "models": ["m"]} for n in NAMES],
        "predictor": {"mode": "off"},
        "health": {"interval_s": 0.25, "timeout_s": 0.5, "unhealthy_after": 2, "healthy_after": 2},
        "limits": {"first_byte_timeout_s": 2.0, "read_timeout_s": 3.0},
        "outlier": {"consecutive_failures": 3, "base_ejection_s": 1.0, "max_ejection_s": 4.0},
    }
    baseline = open_fds()
    proxy = Proxy(parse_config(config))
    server = build_server(proxy)
    await proxy.start()
    await server.start("127.0.0.1", 0)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, open_fds())
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    try:
        tally = await churn(
            f"http://127.0.0.1:{server.port}",
            "m",
            [fleet.url("c")],
            20.0,
            clients=8,
            fault_gap_s=(0.5, 2.0),
            fault_s=(1.0, 3.0),
        )
        deadline = time.monotonic() + 5.0
        while proxy.scheduler._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert tally.lost == 0, tally.lost_examples
        assert tally.outcomes["ok"] > 500 and tally.outcomes["disconnected"] > 20, tally.outcomes
        assert sum(tally.faults.values()) >= 4, tally.faults
        assert not proxy.scheduler._running and proxy.metrics.in_flight == 0
        for backend in proxy.pool.backends:
            held = (backend.in_flight, backend.mine, backend.kv_reserved_tokens, backend.kv_mine)
            assert held == (0, 0, 0, 0), f"{backend.name} still holds {held}"
        # Descriptors stay bounded while it runs: 8 clients, their proxy sides, the upstream pools, probes.
        assert peak < baseline + 120, (baseline, peak)
    finally:
        watcher.cancel()
        await server.stop(1.0)
        await proxy.stop()
    # Every socket the run opened is closed again (fewer is fine: earlier tests' sockets may close meanwhile).
    assert await fds_within(baseline) <= baseline
