"""Fault injection: what a client sees when a backend misbehaves, and what must hold afterwards.

Two emulated vLLM instances serve one model in a child process (real HTTP); ``bad`` gets a fault
through ``POST /_emulator/fault``. The proxy runs in the test's loop so its reservations and
breakers can be read directly. For every fault: each request gets a complete reply or an explicit
OpenAI-format error (never a hang, never the proxy's own 500); afterwards no reservation is left on
any backend; the circuit breaker ejects a backend that fails requests and lets it back once healed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from sloproxy.app import Proxy, build_server
from sloproxy.config import parse_config
from sloproxy.processes import EmulatorProcess
from tests.helpers import get, metric_samples, post_json

MODEL = "m"
MESSAGES = [{"role": "user", "content": "Tell me about failures."}]
HANG_LIMIT_S = 20.0  # a request still unanswered after this is a hang (all timeouts below are < 2 s)


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [{"name": name, "engine": "vllm", "model": MODEL} for name in ("good", "bad")]
    with EmulatorProcess(instances, speedup=20.0) as running:
        yield running


@pytest.fixture(autouse=True)
async def healed(fleet: EmulatorProcess) -> AsyncIterator[None]:
    yield
    for name in ("good", "bad"):
        await fault(fleet, name, "none")


async def fault(fleet: EmulatorProcess, name: str, mode: str, **params: float) -> None:
    status, body, _ = await post_json(fleet.url(name) + "/_emulator/fault", {"mode": mode, **params})
    assert status == 200, body


def config_for(fleet: EmulatorProcess, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backends": [
            {"name": name, "engine": "vllm", "url": fleet.url(name), "models": [MODEL]} for name in ("good", "bad")
        ],
        "policy": {"name": "round-robin"},
        "predictor": {"mode": "off"},
        "health": {"interval_s": 0.1, "timeout_s": 0.5, "unhealthy_after": 1, "healthy_after": 1},
        "limits": {"first_byte_timeout_s": 0.5, "read_timeout_s": 1.0},
        "outlier": {"consecutive_failures": 3, "base_ejection_s": 1.0, "max_ejection_s": 4.0},
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


@asynccontextmanager
async def running_proxy(config: dict[str, Any]) -> AsyncIterator[tuple[Proxy, openai.AsyncOpenAI]]:
    """The proxy in this loop, and an official client for it (no client-side retries)."""
    proxy = Proxy(parse_config(config))
    server = build_server(proxy)
    await proxy.start()
    await server.start("127.0.0.1", 0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=HANG_LIMIT_S * 2
    )
    try:
        yield proxy, client
        await settled(proxy)
    finally:
        await client.close()
        await server.stop(1.0)
        await proxy.stop()


async def settled(proxy: Proxy) -> None:
    """The invariant after any run: nothing in flight, no reservation left on any backend."""
    deadline = time.monotonic() + 5.0
    while proxy.scheduler._running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not proxy.scheduler._running
    assert proxy.metrics.in_flight == 0
    for backend in proxy.pool.backends:
        held = (backend.in_flight, backend.mine, backend.kv_reserved_tokens, backend.kv_mine)
        assert held == (0, 0, 0, 0), f"{backend.name} still holds {held}"


async def ask(client: openai.AsyncOpenAI, *, stream: bool, max_tokens: int = 30) -> str:
    """One request; what the client saw: ``ok`` (a complete reply), ``http_<status>`` (an error
    reply), ``stream_error`` (an error frame after content). A hang fails the test."""

    async def call() -> str:
        try:
            if not stream:
                reply = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=max_tokens, extra_body={"ignore_eos": True}
                )
                assert reply.choices[0].finish_reason == "length"
                assert reply.usage is not None and reply.usage.completion_tokens == max_tokens
                return "ok"
            chunks = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}
            )
            finish = None
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            assert finish == "length"
            return "ok"
        except openai.APIStatusError as error:
            assert error.status_code != 500, f"the proxy's own error: {error}"
            body = error.body
            assert isinstance(body, dict) and body.get("message"), f"not an OpenAI-format error: {body!r}"
            return f"http_{error.status_code}"
        except openai.APIError as error:  # an error frame inside a stream that had begun
            assert error.message, error
            return "stream_error"

    return await asyncio.wait_for(call(), HANG_LIMIT_S)


async def ask_many(client: openai.AsyncOpenAI, count: int, *, stream: bool, max_tokens: int = 30) -> Counter[str]:
    return Counter(await asyncio.gather(*(ask(client, stream=stream, max_tokens=max_tokens) for _ in range(count))))


async def served_by(fleet: EmulatorProcess, name: str) -> int:
    _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
    return sum(json.loads(raw)["finished"].values())


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def until_state(client: openai.AsyncOpenAI, reached, rounds: int = 30) -> None:
    """Send requests, four at a time (so a load-aware policy spreads them), until ``reached()``;
    every one of them must be served."""
    for _ in range(rounds):
        if reached():
            return
        assert await ask_many(client, 4, stream=False) == {"ok": 4}
    assert reached(), "breaker state not reached"


def breaker(proxy: Proxy, name: str):
    backend = next(b for b in proxy.pool.backends if b.name == name)
    assert backend.breaker is not None
    return backend.breaker


# ----- each fault: what the client sees ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reset", "garbage", "hang"])
async def test_failing_backend_is_retried_then_ejected(fleet: EmulatorProcess, mode: str) -> None:
    """Reset connections, garbage replies, a hung engine: every request is served by the healthy
    backend (retried before its first byte); after 3 failures in a row the bad one is ejected and
    costs nothing more. /health keeps passing throughout: the breaker, not the health checks, acts."""
    await fault(fleet, "bad", mode)
    async with running_proxy(config_for(fleet)) as (proxy, client):
        started = time.monotonic()
        outcomes = Counter()
        for stream in (True, True, False, False, True, True):  # round-robin alternates: `bad` gets both kinds
            outcomes[await ask(client, stream=stream)] += 1
        assert outcomes == {"ok": 6}
        state = breaker(proxy, "bad")
        assert state.state == "open" and state.total_ejections == 1
        assert "bad" in {b.name for b in proxy.pool.backends if not b.healthy}
        assert proxy.pool.backends[1].probe_healthy  # its /health never failed
        # Ejected: no request goes near it any more, so no more retries or timeouts.
        retries = proxy.metrics.retries.labels("bad")._value.get()
        began = time.monotonic()
        assert await ask_many(client, 6, stream=True) == {"ok": 6}
        assert time.monotonic() - began < 3.0
        assert proxy.metrics.retries.labels("bad")._value.get() == retries
        _, raw, _ = await get(f"http://127.0.0.1:{proxy_port(client)}/metrics")
        samples = metric_samples(raw.decode())
        assert ({"backend": "bad"}, 2.0) in samples["sloproxy_backend_breaker_state"]
        assert ({"backend": "bad"}, 1.0) in samples["sloproxy_backend_ejections_total"]
        print(f"{mode}: 12 requests all ok in {time.monotonic() - started:.2f}s")


async def test_requests_silently_held_by_a_backend_that_fails_move_to_another(fleet: EmulatorProcess) -> None:
    """A hung engine gives a non-streamed request no first byte to time out on: it would wait out
    `read_timeout_s` (30 s here). Once the health checks take the backend out, the request (which has
    sent nothing to its client yet) moves to the other backend and completes at once."""
    await fault(fleet, "bad", "hang")
    config = config_for(fleet, limits={"first_byte_timeout_s": 30.0, "read_timeout_s": 30.0})
    async with running_proxy(config) as (proxy, client):
        started = time.monotonic()
        calls = asyncio.gather(*(ask(client, stream=stream) for stream in (False, False, True, True)))
        await wait_for(lambda: any(b.name == "bad" and b.in_flight for b in proxy.pool.backends))
        status, body, _ = await post_json(fleet.url("bad") + "/_emulator/health", {"healthy": False})
        assert status == 200, body
        try:
            assert Counter(await calls) == {"ok": 4}
            assert time.monotonic() - started < 10.0  # not the 30 s read timeout
            assert proxy.scheduler.counts["evacuated"] >= 1
        finally:
            await post_json(fleet.url("bad") + "/_emulator/health", {"healthy": True})


def proxy_port(client: openai.AsyncOpenAI) -> int:
    port = client.base_url.port
    assert port is not None
    return port


async def test_killed_mid_stream(fleet: EmulatorProcess) -> None:
    """A backend whose connections die mid-stream: the streams it had begun end with an OpenAI error
    frame then [DONE] (the client's stream raises an APIError), the others complete; it is ejected."""
    await fault(fleet, "bad", "kill_mid_stream", after_s=0.15)
    async with running_proxy(config_for(fleet)) as (proxy, client):
        # ~1.5 s of tokens each at speedup 20: the ones on `bad` are cut 0.15 s in, after their first chunks.
        outcomes = await ask_many(client, 6, stream=True, max_tokens=2000)
        assert outcomes == {"ok": 3, "stream_error": 3}
        assert breaker(proxy, "bad").total_ejections == 1
        assert await ask_many(client, 4, stream=True, max_tokens=50) == {"ok": 4}


async def test_slow_first_byte_within_and_beyond_the_timeout(fleet: EmulatorProcess) -> None:
    """Slow but within first_byte_timeout_s: served where it was sent, nothing counted against it.
    Slower than that: the stream is retried on the other backend after the timeout."""
    await fault(fleet, "bad", "slow_first_byte", delay_s=0.2)
    async with running_proxy(config_for(fleet)) as (proxy, client):
        before = await served_by(fleet, "bad")
        assert await ask_many(client, 4, stream=True) == {"ok": 4}
        assert await served_by(fleet, "bad") == before + 2
        assert breaker(proxy, "bad").failures == 0 and proxy.metrics.retries.labels("bad")._value.get() == 0
        await fault(fleet, "bad", "slow_first_byte", delay_s=1.5)
        waits = []
        for _ in range(2):  # round-robin: one of the two goes to `bad` first
            began = time.monotonic()
            assert await ask(client, stream=True) == "ok"
            waits.append(time.monotonic() - began)
        fast, slow = sorted(waits)
        assert fast < 0.5 and 0.5 <= slow < 1.5, waits  # the first-byte timeout, then the healthy backend
        assert proxy.metrics.retries.labels("bad")._value.get() == 1
        assert breaker(proxy, "bad").failures == 1


async def test_hung_backend_without_another_one_is_an_explicit_timeout(fleet: EmulatorProcess) -> None:
    """With nowhere to retry, a hung backend gives the client a 504 after first_byte_timeout_s
    (streams) or read_timeout_s (non-streamed), not minutes of silence; the breaker cannot eject
    the model's only backend and says so in its refusal count."""
    await fault(fleet, "bad", "hang")
    config = config_for(fleet)
    config["backends"] = [b for b in config["backends"] if b["name"] == "bad"]
    async with running_proxy(config) as (proxy, client):
        began = time.monotonic()
        assert await ask(client, stream=True) == "http_504"
        assert await ask(client, stream=False) == "http_504"
        assert time.monotonic() - began < 3.0
        for _ in range(2):
            assert await ask(client, stream=True) == "http_504"
        state = breaker(proxy, "bad")
        assert state.state == "closed" and state.total_ejections == 0 and state.refused >= 1


async def test_flapping_health(fleet: EmulatorProcess) -> None:
    """A backend that flaps (health and service down together, 0.3 s each way): requests in its down
    phases are reset and retried on the other backend; the client sees only complete replies."""
    await fault(fleet, "bad", "flap_health", period_s=0.3)
    async with running_proxy(config_for(fleet, outlier={"consecutive_failures": 2})) as (proxy, client):
        outcomes: Counter[str] = Counter()
        seen_unhealthy = False
        until = time.monotonic() + 2.0  # about three down phases, requests arriving all along
        while time.monotonic() < until:
            outcomes += await ask_many(client, 4, stream=True)
            seen_unhealthy |= not proxy.pool.backends[1].probe_healthy
        assert set(outcomes) == {"ok"} and outcomes["ok"] >= 20
        assert seen_unhealthy  # the health checks saw it flap
        assert proxy.metrics.retries.labels("bad")._value.get() >= 1  # and requests met a down phase


# ----- the breaker's life cycle ------------------------------------------------------------------------------


async def test_breaker_ejects_lets_back_and_backs_off(fleet: EmulatorProcess) -> None:
    """Eject after 3 failures in a row; half open after base_ejection_s; a successful trial closes
    it (requests reach the healed backend again); a failed trial ejects it again for twice as long.
    Default (queued) policy."""
    config = config_for(fleet, policy={"name": "slo"})
    await fault(fleet, "bad", "reset")
    async with running_proxy(config) as (proxy, client):
        state = breaker(proxy, "bad")
        await until_state(client, lambda: state.total_ejections == 1)
        ejected_at = time.monotonic()
        assert state.state == "open"
        assert state.ejected_until is not None and 0.8 < state.ejected_until - ejected_at <= 1.0

        await fault(fleet, "bad", "none")
        await wait_for(lambda: state.state == "half_open", timeout=3.0)
        assert 0.8 < time.monotonic() - ejected_at < 2.0
        before = await served_by(fleet, "bad")
        await until_state(client, lambda: state.state == "closed")
        assert await served_by(fleet, "bad") > before  # the trial, and what followed, reached it

        await fault(fleet, "bad", "reset")
        await until_state(client, lambda: state.total_ejections == 2)
        await wait_for(lambda: state.state == "half_open", timeout=4.0)  # still broken: the trial fails
        await until_state(client, lambda: state.state != "half_open")
        assert state.state == "open" and state.total_ejections == 3
        assert state.ejected_until is not None and state.ejected_until - time.monotonic() > 2.5  # 4 s (capped)


async def test_never_ejects_a_models_last_backends(fleet: EmulatorProcess) -> None:
    """Both backends failing: at most half of them (max_ejected_fraction 0.5) is ejected, the
    other keeps serving what it can; clients get explicit 502s, never a hang."""
    await fault(fleet, "good", "reset")
    await fault(fleet, "bad", "reset")
    async with running_proxy(config_for(fleet)) as (proxy, client):
        outcomes = Counter()
        for _ in range(8):
            outcomes[await ask(client, stream=False)] += 1
        assert outcomes == {"http_502": 8}
        states = sorted(breaker(proxy, name).state for name in ("good", "bad"))
        assert states == ["closed", "open"]
        assert sum(breaker(proxy, name).refused for name in ("good", "bad")) >= 1
