"""--speedup K divides every duration: client wall-clock x K matches the emulated timings."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from sloproxy.processes import EmulatorProcess
from tests.helpers import get, metric_samples

TOKENS = 60


async def _timed_stream(url: str, runs: int = 7) -> tuple[float, float]:
    """Wall-clock (TTFT, mean gap between tokens) of streamed completions, one after another on a warm
    connection: the smallest TTFT and the median gap (a loaded machine adds hiccups, never removes time;
    three runs were once all slowed by one busy stretch of a shared host, so seven).
    Each prompt starts differently, so no run reuses another's cached prefix."""
    ttfts: list[float] = []
    gaps: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as warm:
            await warm.read()
        for run in range(runs):
            body = {"model": "m", "prompt": f"{run} " + "hello " * 400, "max_tokens": TOKENS, "ignore_eos": True}
            stamps: list[float] = []
            started = time.perf_counter()
            async with session.post(url + "/v1/completions", json={**body, "stream": True}) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        stamps.append(time.perf_counter() - started)
            assert len(stamps) == TOKENS
            ttfts.append(stamps[0])
            gaps.append((stamps[-1] - stamps[0]) / (TOKENS - 1))
    return min(ttfts), sorted(gaps)[len(gaps) // 2]


async def _emulated(url: str) -> tuple[float, float]:
    _, raw, _ = await get(url + "/metrics")
    samples = metric_samples(raw.decode())

    def mean(histogram: str) -> float:
        return samples[histogram + "_sum"][0][1] / samples[histogram + "_count"][0][1]

    return mean("vllm:time_to_first_token_seconds"), mean("vllm:inter_token_latency_seconds")


@pytest.mark.parametrize("speedup", [1.0, 8.0])
async def test_wall_clock_times_speedup_equal_emulated(speedup):
    # A100 40 GB: ~13 ms per token emulated, so speedup 8 still leaves > 1 ms per real step.
    instance = {"name": "v", "engine": "vllm", "model": "m", "profile": "a100-40g-llama3-8b"}
    with EmulatorProcess([instance], speedup=speedup) as fleet:
        url = fleet.url("v")
        wall_ttft, wall_gap = await _timed_stream(url)
        emulated_ttft, emulated_itl = await _emulated(url)
        _, raw, _ = await get(url + "/_emulator/state")
        assert json.loads(raw)["speedup"] == speedup
    # The emulated figures do not depend on K ...
    assert emulated_itl == pytest.approx(0.0135, rel=0.1)
    assert emulated_ttft == pytest.approx(0.040, rel=0.35)
    # ... and what a client measures, scaled back by K, agrees with them.
    assert wall_gap * speedup == pytest.approx(emulated_itl, rel=0.2)
    assert wall_ttft * speedup == pytest.approx(emulated_ttft, abs=0.004 * speedup, rel=0.3)
