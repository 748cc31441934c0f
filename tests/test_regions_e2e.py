"""Regions end to end: emulated vLLM engines in two regions, the proxy with a ``regions:`` section,
driven by the official openai client over real HTTP.

Each region has one emulated A10 (11,664 KV tokens), so a few long prompts fill a region. The proxy
runs in the test's loop so the router's view (utilisation, hold-back depths) can be read while the
emulators' own counters say which engine served each request. Long requests carry ~2,400-token
prompts, so each one holds about a quarter of a region's KV (the proxy's reservation: prompt plus
reply estimate; the engine's own reading, prompt plus the reply so far, stays within 0.02 of it).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from sloproxy.app import Proxy, build_server
from sloproxy.auth import hash_key
from sloproxy.config import parse_config
from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import get, metric_samples, post_json

MODEL = "m"
REGIONS = {"eu-1": "eu", "us-1": "us"}
POOLS = {"eu-1": "reserved", "us-1": "spot"}
HANG_LIMIT_S = 30.0
LONG_PROMPT_WORDS = 2400  # one token each: with the JSON around it ~2,430 estimated prompt tokens
LONG_REPLY_TOKENS = 400


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [{"name": name, "engine": "vllm", "model": MODEL, "profile": "a10-llama2-7b"} for name in REGIONS]
    with EmulatorProcess(instances, speedup=10.0) as running:
        yield running


def config_for(fleet: EmulatorProcess, **regions: Any) -> dict[str, Any]:
    return {
        "backends": [
            {
                "name": name,
                "engine": "vllm",
                "url": fleet.url(name),
                "models": [MODEL],
                "region": region,
                "pool": POOLS[name],
            }
            for name, region in REGIONS.items()
        ],
        "policy": {"name": "fcfs"},
        "predictor": {"mode": "off"},
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
        "load_polling": {"interval_s": 0.05, "timeout_s": 0.5},
        "regions": {
            "preference": ["eu", "us"],
            "interactive_kv_threshold": 0.6,
            "release_kv_threshold": 0.3,
            **regions,
        },
    }


@asynccontextmanager
async def running_proxy(
    config: dict[str, Any], config_path: Path | None = None
) -> AsyncIterator[tuple[Proxy, openai.AsyncOpenAI]]:
    """The proxy in this loop (from ``config_path`` when given: reloads re-read it) and an openai client."""
    if config_path is not None:
        config_path.write_text(yaml.safe_dump(config))
    proxy = Proxy(parse_config(config), config_path=config_path)
    server = build_server(proxy)
    await proxy.start()
    await server.start("127.0.0.1", 0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=HANG_LIMIT_S
    )
    try:
        await wait_for(lambda: all(b.healthy and b.load is not None for b in proxy.pool.backends))
        yield proxy, client
        await wait_for(lambda: not proxy.scheduler._running)
        for backend in proxy.pool.backends:  # nothing left reserved anywhere
            assert (backend.in_flight, backend.kv_reserved_tokens) == (0, 0), backend.name
    finally:
        await client.close()
        await server.stop(1.0)
        await proxy.stop()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def served(fleet: EmulatorProcess) -> dict[str, int]:
    """Requests each engine has finished (its own counter, not the proxy's)."""
    counts = {}
    for name in REGIONS:
        _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
        counts[name] = sum(json.loads(raw)["finished"].values())
    return counts


async def ask(
    client: openai.AsyncOpenAI,
    *,
    content: str = "Say hello.",
    max_tokens: int = 4,
    headers: dict[str, str] | None = None,
) -> str:
    """One streamed request: ``ok`` (complete, every token), ``http_<status>:<code>`` (an OpenAI-format
    error reply). Anything else (a hang, a malformed error) fails the test."""

    async def call() -> str:
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                extra_headers=headers or {},
            )
            finish = usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            assert (finish, usage) == ("length", max_tokens)
            return "ok"
        except openai.APIStatusError as error:
            body = error.body
            assert isinstance(body, dict) and body.get("message"), f"not an OpenAI-format error: {body!r}"
            return f"http_{error.status_code}:{body.get('code')}"

    return await asyncio.wait_for(call(), HANG_LIMIT_S)


def long_prompt(index: int) -> str:
    return f"Request {index}:" + " abc" * LONG_PROMPT_WORDS  # distinct first tokens: no shared prefix blocks


async def test_interactive_prefers_region_spills_when_full_and_batch_waits_for_room(fleet):
    config = config_for(fleet)
    async with running_proxy(config) as (proxy, client):
        router = proxy.scheduler.regions
        assert router is not None and router.regions == ("eu", "us")

        def eu_used() -> float:
            return router.utilisation(MODEL, "eu")

        # An idle fleet: interactive work lands in the first preferred region.
        before = await served(fleet)
        assert [await ask(client) for _ in range(3)] == ["ok"] * 3
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (3, 0)
        # A client's own order (the header) comes first.
        assert await ask(client, headers={"x-sloproxy-region": "us"}) == "ok"
        before, after = after, await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (0, 1)

        # Two long requests: eu is loaded (~0.46) but still under the interactive threshold (0.6).
        longs = [
            asyncio.ensure_future(ask(client, content=long_prompt(i), max_tokens=LONG_REPLY_TOKENS)) for i in range(2)
        ]
        await wait_for(lambda: len(proxy.scheduler._running) == 2)
        assert 0.3 < eu_used() < 0.6
        before = await served(fleet)
        assert await ask(client) == "ok"
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (1, 0)

        # Batch is pinned to eu (the interactive choice) and held: eu is over the release threshold.
        batch = asyncio.ensure_future(ask(client, headers={"x-slo-class": "batch"}))
        await wait_for(lambda: router.depths().get((MODEL, "eu")) == 1)
        held = metric_samples(proxy.metrics.render().decode())["sloproxy_region_held_requests"]
        assert ({"model": MODEL, "region": "eu"}, 1.0) in held

        # A third long request still fits under 0.6 when it arrives; after it eu is over the threshold.
        longs.append(asyncio.ensure_future(ask(client, content=long_prompt(2), max_tokens=LONG_REPLY_TOKENS)))
        await wait_for(lambda: len(proxy.scheduler._running) == 3)
        assert eu_used() >= 0.6
        assert router.utilisation(MODEL, "us") < 0.6
        before = await served(fleet)
        assert await ask(client) == "ok"  # spills to us
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (0, 1)
        assert not batch.done() and router.depths()[(MODEL, "eu")] == 1

        # The long requests finish; eu drops to at most one of them and the batch request runs there.
        before = await served(fleet)
        assert await asyncio.gather(*longs) == ["ok"] * 3
        assert await batch == "ok"
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (4, 0)
        assert router.depths()[(MODEL, "eu")] == 0
        dispatched = metric_samples(proxy.metrics.render().decode())["sloproxy_region_dispatched_total"]
        by_region = {(labels["region"], labels["pool"]): value for labels, value in dispatched}
        # eu: 3 + 2 long + 1 + 1 long + batch; us: the header's and the spilled one
        assert by_region == {("eu", "reserved"): 8.0, ("us", "spot"): 2.0}


async def test_held_work_past_max_queue_or_its_timeout_gets_openai_errors(fleet):
    config = {**config_for(fleet), "scheduling": {"max_queue": 2, "queue_timeout_s": 0.5}}
    async with running_proxy(config) as (proxy, client):
        router = proxy.scheduler.regions
        longs = [
            asyncio.ensure_future(ask(client, content=long_prompt(10 + i), max_tokens=LONG_REPLY_TOKENS))
            for i in range(2)
        ]
        await wait_for(lambda: len(proxy.scheduler._running) == 2)
        assert router.utilisation(MODEL, "eu") > 0.3  # held work waits
        batch = [asyncio.ensure_future(ask(client, headers={"x-slo-class": "batch"})) for _ in range(2)]
        await wait_for(lambda: router.held_count == 2)
        # the hold-back queues count against max_queue: a third is refused at once
        assert await ask(client, headers={"x-slo-class": "batch"}) == "http_429:queue_full"
        # the held ones time out with the scheduler's usual error, before the long requests end
        assert await asyncio.gather(*batch) == ["http_429:queue_timeout"] * 2
        assert not any(t.done() for t in longs)
        assert await asyncio.gather(*longs) == ["ok"] * 2
        assert router.held_count == 0
        assert proxy.scheduler.counts["queue_full"] == 1 and proxy.scheduler.counts["queue_timeout"] == 2


ADMIN_KEY = "sk-admin-regions-0000"


def admin_url(client: openai.AsyncOpenAI, route: str) -> str:
    return f"http://127.0.0.1:{client.base_url.port}/admin/{route}"


async def reload(client: openai.AsyncOpenAI, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the config file and POST /admin/reload (what SIGHUP also runs)."""
    path.write_text(yaml.safe_dump(config))
    status, body, _ = await post_json(admin_url(client, "reload"), {}, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200, body
    return body


async def admin_fleet(client: openai.AsyncOpenAI) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        url = admin_url(client, "fleet")
        async with session.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
            assert response.status == 200
            return {b["name"]: b for b in (await response.json())["backends"]}


async def test_reload_applies_regions_and_backend_tags_and_keeps_held_work(fleet, tmp_path):
    path = tmp_path / "proxy.yaml"
    config = {**config_for(fleet), "admin": {"api_keys": [hash_key(ADMIN_KEY)]}}
    async with running_proxy(config, path) as (proxy, client):
        longs = [
            asyncio.ensure_future(ask(client, content=long_prompt(20 + i), max_tokens=LONG_REPLY_TOKENS))
            for i in range(2)
        ]
        await wait_for(lambda: len(proxy.scheduler._running) == 2)  # eu-1 at ~0.46: held work waits
        batch = asyncio.ensure_future(ask(client, headers={"x-slo-class": "batch"}))
        await wait_for(lambda: proxy.scheduler.regions.depths().get((MODEL, "eu")) == 1)

        # 1. The fleet's order changes: the held request follows it to us (idle) and is served there.
        before = await served(fleet)
        config["regions"] = {**config["regions"], "preference": ["us", "eu"]}
        body = await reload(client, path, config)
        assert (body["applied"], body["needs_restart"]) == (["regions"], [])
        assert await batch == "ok"
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (0, 1)
        assert proxy.scheduler.regions.held_count == 0

        # 2. A request held for eu by its header, then eu and us swap their backends (tags only).
        batch = asyncio.ensure_future(ask(client, headers={"x-slo-class": "batch", "x-sloproxy-region": "eu"}))
        await wait_for(lambda: proxy.scheduler.regions.depths().get((MODEL, "eu")) == 1)
        before = await served(fleet)
        swapped = {"eu-1": ("us", "spot"), "us-1": ("eu", "reserved")}
        for backend in config["backends"]:
            backend["region"], backend["pool"] = swapped[backend["name"]]
        body = await reload(client, path, config)
        assert (body["applied"], body["needs_restart"]) == (["backends.region/pool"], [])
        assert await batch == "ok"  # still wants eu, which is now us-1 (idle): released, not lost
        assert await ask(client) == "ok"  # fleet order us first: us is now eu-1, at ~0.46 < 0.6
        after = await served(fleet)
        assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (1, 1)
        state = await admin_fleet(client)
        assert {n: (b["region"], b["pool"]) for n, b in state.items()} == swapped
        assert proxy.config.backends == parse_config(config).backends
        assert not any(t.done() for t in longs)  # all of the above happened under load

        # 3. A change beyond the tags is not applied, and is listed as needing a restart.
        config["backends"][0] = {**config["backends"][0], "url": fleet.url("us-1")}  # eu-1's
        config["backends"][1] = {**config["backends"][1], "pool": "preemptible"}  # us-1's
        body = await reload(client, path, config)
        assert (body["applied"], body["needs_restart"]) == (["backends.region/pool"], ["backends"])
        eu_1, us_1 = proxy.pool.backends
        assert (eu_1.url, us_1.config.pool) == (fleet.url("eu-1"), "preemptible")
        assert await asyncio.gather(*longs) == ["ok"] * 2


async def test_sighup_reload_retags_backends_in_a_served_proxy(fleet):
    config = {**config_for(fleet), "admin": {"api_keys": [hash_key(ADMIN_KEY)]}}
    with ProxyProcess(config) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_LIMIT_S)
        try:
            before = await served(fleet)
            assert await ask(client) == "ok"
            for backend in config["backends"]:
                backend["region"] = {"eu": "us", "us": "eu"}[backend["region"]]
                backend["pool"] = "flex"
            (proxy.workdir / "proxy.yaml").write_text(yaml.safe_dump({**config, "listen": proxy.config["listen"]}))
            proxy.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (await admin_fleet(client))["us-1"]["region"] != "eu":
                assert time.monotonic() < deadline, "SIGHUP did not reload the config"
                await asyncio.sleep(0.05)
            assert await ask(client) == "ok"  # eu first: now us-1
            after = await served(fleet)
            assert (after["eu-1"] - before["eu-1"], after["us-1"] - before["us-1"]) == (1, 1)
            _, raw, _ = await get(proxy.url + "/metrics")
            dispatched = metric_samples(raw.decode())["sloproxy_region_dispatched_total"]
            assert sorted((s["region"], s["pool"], v) for s, v in dispatched) == [
                ("eu", "flex", 1.0),  # us-1, since the reload
                ("eu", "reserved", 1.0),  # eu-1, before it (kept: a counter); us/spot never counted: gone
                ("us", "flex", 0.0),  # eu-1 now
            ]
        finally:
            await client.close()
