"""Under a flood of batch work, interactive requests keep their SLO with a queueing policy and
miss it with round-robin (assert the attainment numbers).

Two emulated vLLM instances (A100 40 GB, 16 sequences at most) at speedup 5. At t=0, 160 batch
requests of 1000 tokens arrive; then an interactive request (40 tokens, streamed) every 100 ms.
Interactive SLO (the default class): TTFT <= 1.5 s and <= 0.10 s per output token, in
emulated seconds (client wall-clock x speedup).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from sloproxy.processes import EmulatorProcess, ProxyProcess

SPEEDUP = 5.0  # a wall-clock hiccup on a busy 2-core machine counts K times: keep K modest
BATCH, INTERACTIVE = 160, 40


async def _interactive(session: aiohttp.ClientSession, url: str, index: int) -> tuple[float, float]:
    body = {"model": "m", "prompt": f"question {index}", "max_tokens": 40, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter() - started)
    ttft = stamps[0] * SPEEDUP
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * SPEEDUP
    return ttft, tpot


async def _batch(session: aiohttp.ClientSession, url: str, index: int) -> None:
    body = {"model": "m", "prompt": f"batch job {index}", "max_tokens": 1000, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body, headers={"x-slo-class": "batch"}) as response:
        await response.read()


async def interactive_attainment(policy: str, params: dict | None = None) -> tuple[float, list[tuple[float, float]]]:
    if policy in ("edf", "priority-fair"):
        params = {"evict_margin_s": 0.5 / SPEEDUP, **(params or {})}
    instances = [
        {"name": n, "engine": "vllm", "model": "m", "profile": "a100-40g-llama3-8b", "max_num_seqs": 16}
        for n in ("a", "b")
    ]
    with EmulatorProcess(instances, speedup=SPEEDUP) as fleet:
        config = {
            "backends": [{"name": n, "engine": "vllm", "url": fleet.url(n), "models": ["m"]} for n in ("a", "b")],
            "policy": {"name": policy, "params": params or {}},
            "load_polling": {"interval_s": 0.05},
            # Every duration the proxy acts on runs K times faster, as the engines do (timer included:
            # at 50 ms wall it decided evictions only every 0.5 emulated seconds).
            "scheduling": {"shed_tpot_s": 0.02 / SPEEDUP, "tick_s": 0.05 / SPEEDUP},
            # The proxy runs in real time: the default classes' targets, divided by the speedup.
            "slo_classes": [
                {"name": "interactive", "ttft_s": 1.5 / SPEEDUP, "tpot_s": 0.10 / SPEEDUP, "band": 0},
                {"name": "batch", "deadline_s": 60 / SPEEDUP, "band": 1, "sheddable": True},
            ],
        }
        with ProxyProcess(config) as proxy:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                flood = [asyncio.ensure_future(_batch(session, proxy.url, i)) for i in range(BATCH)]
                await asyncio.sleep(0.2)
                probes = []
                for index in range(INTERACTIVE):
                    probes.append(asyncio.ensure_future(_interactive(session, proxy.url, index)))
                    await asyncio.sleep(0.1)
                results = await asyncio.gather(*probes)
                for job in flood:
                    job.cancel()
                await asyncio.gather(*flood, return_exceptions=True)
    met = [ttft <= 1.5 and tpot <= 0.10 for ttft, tpot in results]
    return sum(met) / len(met), results


@pytest.mark.parametrize("policy", ["priority-fair", "edf"])
async def test_queueing_policies_keep_interactive_slo_where_round_robin_fails(policy):
    baseline, baseline_results = await interactive_attainment("round-robin")
    attained, results = await interactive_attainment(policy)
    assert baseline <= 0.3, f"round-robin unexpectedly kept the SLO: {baseline:.0%} {baseline_results}"
    assert attained >= 0.9, f"{policy}: only {attained:.0%} of interactive requests met their SLO: {results}"


async def test_eviction_rescues_interactive_work_when_batch_holds_every_slot():
    """With no reserve, batch fills every budget; evicting silent batch work keeps TTFT."""
    without, _ = await interactive_attainment("priority-fair", {"reserve": 0.0, "evict": False})
    with_eviction, results = await interactive_attainment("priority-fair", {"reserve": 0.0, "evict": True})
    assert without <= 0.75, f"expected many misses without eviction, got {without:.0%}"
    assert with_eviction >= 0.9, f"eviction kept only {with_eviction:.0%}: {results}"
