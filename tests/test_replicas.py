"""Several proxy replicas sharing scheduler state in Redis, end to end: real replicas (child
processes), a real redis-server, emulated engines, the official ``openai`` client.

* The fleet-wide dispatch budget holds: each engine's own peak of requests inside it stays within
  the budget the replicas share, while three replicas with embedded state (the control) overrun it.
* A replica killed with SIGKILL and Redis killed and restarted mid-run fail no request on the
  surviving replicas, and the dead replica's share returns to them within the lease.
* A stretch of the Azure conversation trace replayed over three replicas (requests alternating
  between them) meets its SLOs within 3 points of one replica at the same total load, inside the
  shared budget, and with a replica killed and Redis restarted mid-replay nothing sent to the
  survivors fails. (``bench/replicas.py`` compares them under heavier load on the demo fleet.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from sloproxy.evaluation.build import BuildOptions, build_to_file, parse_models
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.workload import WorkloadRequest
from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.redis_server import RedisServer

SPEEDUP = 10.0
# The replayed-trace tests run at a lower speedup: the state sync runs in real time, so a slot takes K times
# longer to move between replicas in emulated time. At 10 on a slower machine (a 10M-step Python
# loop in 2.3 s) three replicas met 86-93% against one replica's 100% in every run; the same code
# had held parity within 3 points at 10 on faster ones.
REPLAY_SPEEDUP = 4.0
BUDGET = 3  # per backend, fixed (min = max) so the check is exact
LEASE_S = 1.0
REPLICAS = 3
STREAMS = 48


REPLAY_BUDGET = 6  # per backend, fixed (min = max), so the engines' own peaks check it exactly
REPLAY_RATE = 1.0  # x the trace: one replica meets ~100%; nearer saturation the gap widens (docs/architecture.md)


def fleet(lengths: Path | None = None, speedup: float = SPEEDUP) -> EmulatorProcess:
    instances = [{"name": f"v{i}", "engine": "vllm", "model": "m"} for i in (1, 2)]
    extra = {"lengths": str(lengths)} if lengths is not None else None
    return EmulatorProcess(instances, speedup=speedup, extra=extra)


def replica_config(engines: EmulatorProcess, redis: RedisServer | None, budget: int = BUDGET) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backends": [{"name": n, "engine": "vllm", "url": engines.url(n), "models": ["m"]} for n in ("v1", "v2")],
        "policy": {"name": "slo"},
        "predictor": {"mode": "off"},
        "scheduling": {"budget_initial": budget, "budget_min": budget, "budget_max": budget, "tick_s": 0.005},
        "load_polling": {"interval_s": 0.1},
    }
    if redis is not None:
        config["state"] = {"backend": "redis", "url": redis.url, "lease_s": LEASE_S, "sync_interval_s": 0.05}
    return config


def start_replicas(stack: ExitStack, config: dict[str, Any]) -> list[ProxyProcess]:
    return [stack.enter_context(ProxyProcess(config)) for _ in range(REPLICAS)]


def clients(replicas: list[ProxyProcess]) -> list[openai.AsyncOpenAI]:
    """One official client per replica (a client is costly to build: one per request would make the
    test's own process the bottleneck)."""
    return [openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0, timeout=60) for r in replicas]


async def one_stream(client: openai.AsyncOpenAI, index: int) -> str:
    """One streamed chat through the official client; returns "ok" or the failure's type."""
    try:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Tell me about {index}."}],
            max_tokens=120,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        return "ok" if chunks and chunks[-1].choices[0].finish_reason == "length" else "truncated"
    except openai.APIError as error:
        return type(error).__name__


async def peaks(engines: EmulatorProcess) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        out = {}
        for name in ("v1", "v2"):
            async with session.get(engines.url(name) + "/_emulator/state") as response:
                out[name] = (await response.json())["peak_in_engine"]
        return out


async def metric(url: str, name: str) -> float:
    """One sample of ``/metrics`` by its full name with labels, e.g. ``x{backend="v1"}``."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported by {url}")


async def sees_live_replicas(url: str, count: int) -> bool:
    return await metric(url, "sloproxy_state_live_replicas") == count


async def caps_sum_to_budget(urls: list[str], budget: int = BUDGET) -> bool:
    for backend in ("v1", "v2"):
        caps = [await metric(u, f'sloproxy_backend_cap_requests{{backend="{backend}"}}') for u in urls]
        if sum(caps) != budget:
            return False
    return True


async def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_replicas_with_embedded_state_overrun_the_budget_the_control():
    with ExitStack() as stack:
        engines = stack.enter_context(fleet())
        replicas = start_replicas(stack, replica_config(engines, None))
        each = clients(replicas)
        outcomes = await asyncio.gather(*(one_stream(each[i % REPLICAS], i) for i in range(STREAMS)))
        assert outcomes.count("ok") == STREAMS
        assert min((await peaks(engines)).values()) > BUDGET  # each replica spends the whole budget


async def test_replicas_share_the_budget_and_survive_a_replica_kill_and_a_redis_restart(redis):
    with ExitStack() as stack:
        engines = stack.enter_context(fleet())
        replicas = start_replicas(stack, replica_config(engines, redis))
        survivors, victim = replicas[:2], replicas[2]
        each = clients(replicas)
        await wait_for(lambda: sees_live_replicas(survivors[0].url, REPLICAS), 10)
        await wait_for(lambda: caps_sum_to_budget([r.url for r in replicas]), 10)  # after the new-epoch freeze

        tasks = [asyncio.ensure_future(one_stream(each[i % REPLICAS], i)) for i in range(STREAMS)]
        await asyncio.sleep(0.6)
        victim.kill()  # SIGKILL: its records stay in Redis until the lease runs out
        await asyncio.sleep(0.4)
        redis.kill()  # Redis dies with every share and record in it...
        await asyncio.sleep(0.5)
        redis.start()  # ...and comes back empty
        outcomes = await asyncio.gather(*tasks)
        on_survivors = [o for i, o in enumerate(outcomes) if i % REPLICAS != 2]
        assert on_survivors == ["ok"] * len(on_survivors)  # nothing failed on the replicas that lived
        assert list((await peaks(engines)).values()) == [BUDGET, BUDGET]  # used in full, never exceeded

        # The dead replica's share came back: the survivors' shares add up to the whole budget again.
        await wait_for(lambda: sees_live_replicas(survivors[0].url, 2), 10)
        more = asyncio.gather(*(one_stream(each[i % 2], i) for i in range(4 * BUDGET)))
        await wait_for(lambda: caps_sum_to_budget([r.url for r in survivors]), 10)
        assert await more == ["ok"] * 4 * BUDGET
        for replica in survivors:
            assert await metric(replica.url, "sloproxy_state_degraded") == 0.0
            assert await metric(replica.url, "sloproxy_state_sync_failures_total") >= 1  # it saw the outage


# ----- a replayed trace ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_workload(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[WorkloadRequest], Path]:
    """90 s of the Azure conversation trace at REPLAY_RATE, for model ``m`` (Llama-3-8B reply lengths);
    the file also tells the emulators each reply's length."""
    path = tmp_path_factory.mktemp("replay") / "workload.jsonl"
    workload = build_to_file(
        BuildOptions(
            trace=str(shared_data / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(shared_data / "lengths"),
            models=parse_models("m=Meta-Llama-3-8B-Instruct"),
            duration_s=90.0,
            rate_scale=REPLAY_RATE,
            max_context=4096,
            seed=1,
        ),
        path,
    )
    return workload, path


async def replay_through(replicas: list[ProxyProcess], workload: list[WorkloadRequest]) -> tuple[float, list[str]]:
    """Replay ``workload`` alternating over ``replicas``: overall SLO attainment, and each request's
    status in workload order (request ``i`` went to replica ``i % len(replicas)``)."""
    meta, records = await replay_run(
        workload, ",".join(r.url for r in replicas), workload="conv", label="replicas", speedup=REPLAY_SPEEDUP
    )
    return summarize(meta, records)["overall"]["slo_attainment"], [r.status for r in records]


async def test_a_replayed_trace_over_three_replicas_meets_one_replicas_slos_within_the_budget(conv_workload, redis):
    workload, lengths = conv_workload
    with ExitStack() as stack:  # the reference: one replica, embedded state
        engines = stack.enter_context(fleet(lengths, REPLAY_SPEEDUP))
        one = [stack.enter_context(ProxyProcess(replica_config(engines, None, REPLAY_BUDGET)))]
        alone, alone_statuses = await replay_through(one, workload)
    with ExitStack() as stack:
        engines = stack.enter_context(fleet(lengths, REPLAY_SPEEDUP))
        replicas = start_replicas(stack, replica_config(engines, redis, REPLAY_BUDGET))
        await wait_for(lambda: sees_live_replicas(replicas[0].url, REPLICAS), 10)
        await wait_for(lambda: caps_sum_to_budget([r.url for r in replicas], REPLAY_BUDGET), 10)
        shared, shared_statuses = await replay_through(replicas, workload)
        inside = await peaks(engines)
    assert alone_statuses == ["ok"] * len(workload)
    assert shared_statuses == ["ok"] * len(workload)
    assert max(inside.values()) <= REPLAY_BUDGET  # the engines' own count: the fleet's budget held
    assert alone >= 0.95, alone  # a load one replica serves (else the comparison says little)
    assert shared >= alone - 0.03, f"three replicas {shared:.3f}, one {alone:.3f}"


async def test_a_replayed_trace_survives_a_replica_kill_and_a_redis_restart(conv_workload, redis):
    workload, lengths = conv_workload
    with ExitStack() as stack:
        engines = stack.enter_context(fleet(lengths, REPLAY_SPEEDUP))
        replicas = start_replicas(stack, replica_config(engines, redis, REPLAY_BUDGET))
        victim = replicas[2]
        await wait_for(lambda: sees_live_replicas(replicas[0].url, REPLICAS), 10)
        await wait_for(lambda: caps_sum_to_budget([r.url for r in replicas], REPLAY_BUDGET), 10)
        replay = asyncio.ensure_future(replay_through(replicas, workload))
        span_s = workload[-1].arrival_s / REPLAY_SPEEDUP  # wall seconds of sending
        await asyncio.sleep(0.3 * span_s)
        victim.kill()
        await asyncio.sleep(0.1 * span_s)
        redis.kill()
        await asyncio.sleep(0.5)
        redis.start()
        _, statuses = await replay
        inside = await peaks(engines)
    on_survivors = [s for i, s in enumerate(statuses) if i % REPLICAS != 2]
    assert on_survivors == ["ok"] * len(on_survivors)
    on_victim = [s for i, s in enumerate(statuses) if i % REPLICAS == 2]
    assert "error" in on_victim  # it did die mid-replay (the requests sent to it after fail)
    assert max(inside.values()) <= REPLAY_BUDGET
