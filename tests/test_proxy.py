"""The proxy in front of each emulated engine kind, driven by the official openai client.

One proxy replica (a child process) serves three models, each on one engine kind, so every
test can be run per engine and the client-visible behaviour compared.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port
from tests.helpers import get, metric_samples, post_json, sse_events, stream_raw

ENGINES = ("vllm", "tgi", "sglang")
MESSAGES = [{"role": "user", "content": "Tell me about queues."}]


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [
        {"name": "vllm", "engine": "vllm", "model": "m-vllm", "max_model_len": 4096},
        {"name": "tgi", "engine": "tgi", "model": "m-tgi", "profile": "a100-80g-llama3-8b", "max_model_len": 4096},
        {"name": "sglang", "engine": "sglang", "model": "m-sglang", "max_model_len": 4096},
        {"name": "rr-a", "engine": "vllm", "model": "shared"},
        {"name": "rr-b", "engine": "vllm", "model": "shared"},
    ]
    with EmulatorProcess(instances, speedup=20.0) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(fleet: EmulatorProcess) -> Iterator[ProxyProcess]:
    backends = [{"name": name, "engine": name, "url": fleet.url(name), "models": [f"m-{name}"]} for name in ENGINES] + [
        {"name": "rr-a", "engine": "vllm", "url": fleet.url("rr-a"), "models": ["shared"]},
        {"name": "rr-b", "engine": "vllm", "url": fleet.url("rr-b"), "models": ["shared"]},
        # Nothing listens here: the only backend for "orphan" is down.
        {"name": "dead", "engine": "vllm", "url": f"http://127.0.0.1:{free_port()}", "models": ["orphan"]},
    ]
    config = {
        "backends": backends,
        "policy": {"name": "round-robin"},
        "health": {"interval_s": 0.2, "timeout_s": 0.5, "unhealthy_after": 1},
        "limits": {"max_body_bytes": 65536},
    }
    with ProxyProcess(config) as running:
        yield running


def sync_client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


def async_client(proxy: ProxyProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


# ----- the official client, every engine kind, every mode -----------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_sync_chat_and_completion(proxy, engine):
    client = sync_client(proxy)
    chat = client.chat.completions.create(model=f"m-{engine}", messages=MESSAGES, max_tokens=8)
    assert chat.object == "chat.completion"
    assert chat.model == f"m-{engine}"
    assert chat.id.startswith("chatcmpl-") or engine == "sglang"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
    completion = client.completions.create(model=f"m-{engine}", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.usage.completion_tokens <= 5


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_streams(proxy, engine):
    client = sync_client(proxy)
    chunks = list(
        client.chat.completions.create(
            model=f"m-{engine}", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert all(c.model == f"m-{engine}" for c in chunks)
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=f"m-{engine}", prompt="Hello", max_tokens=4, stream=True)
        if c.choices
    )
    assert text


@pytest.mark.parametrize("engine", ENGINES)
async def test_async_chat_stream_and_completion(proxy, engine):
    client = async_client(proxy)
    stream = await client.chat.completions.create(model=f"m-{engine}", messages=MESSAGES, max_tokens=5, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: the proxy strips it
    reply = await client.completions.create(model=f"m-{engine}", prompt="Hi there", max_tokens=3)
    assert reply.usage.completion_tokens <= 3
    await client.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_stream_frames_are_openai_shaped(proxy, engine):
    """Same frame grammar whatever the engine: `data: ` frames, role first, finish, [DONE]."""
    status, raw = await stream_raw(
        proxy.url + "/v1/chat/completions",
        {"model": f"m-{engine}", "messages": MESSAGES, "max_tokens": 4, "stream": True},
    )
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first = dict(chunks[0]["choices"][0]["delta"])
    first.pop("reasoning_content", None)  # SGLang 0.5 adds it (null) to every chat delta
    assert first == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["object"] == "chat.completion.chunk" and c["id"] for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c or c["usage"] is None for c in chunks)


@pytest.mark.parametrize("engine", ENGINES)
async def test_proxy_learns_usage_even_when_not_asked(proxy, engine):
    def completion_tokens(text: str) -> float:
        return sum(
            v
            for labels, v in metric_samples(text).get("sloproxy_tokens_total", [])
            if labels == {"model": f"m-{engine}", "kind": "completion"}
        )

    _, raw, _ = await get(proxy.url + "/metrics")
    before = completion_tokens(raw.decode())
    body = {"model": f"m-{engine}", "messages": MESSAGES, "max_tokens": 9, "stream": True}
    _, stream = await stream_raw(proxy.url + "/v1/chat/completions", body)
    streamed = sum(
        1
        for e in sse_events(stream)[:-1]
        if (c := json.loads(e))["choices"] and c["choices"][0]["delta"].get("content")
    )
    _, raw, _ = await get(proxy.url + "/metrics")
    assert completion_tokens(raw.decode()) - before == streamed


async def test_unknown_fields_pass_through(proxy):
    for engine in ("vllm", "sglang"):
        status, body, _ = await post_json(
            proxy.url + "/v1/completions",
            {"model": f"m-{engine}", "prompt": "x", "max_tokens": 7, "ignore_eos": True, "min_tokens": 1},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 7


# ----- errors ------------------------------------------------------------------------------------------
async def test_bad_input_gets_openai_errors(proxy):
    url = proxy.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"{broken") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        async with session.post(url, data=b"x" * 70000) as response:
            assert response.status == 413
            assert "larger than" in (await response.json())["error"]["message"]
        async with session.get(proxy.url + "/v1/nothing-here") as response:
            assert response.status == 404 and "error" in await response.json()
    status, body, _ = await post_json(url, {"model": "m-vllm", "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body, _ = await post_json(url, {"messages": MESSAGES})
    assert status == 400 and "model" in body["error"]["message"]
    status, body, _ = await post_json(url, {"model": "m-vllm", "messages": MESSAGES, "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body, _ = await post_json(url, [1, 2])
    assert status == 400


def test_unknown_model_is_404_and_unserved_model_is_503(proxy):
    client = sync_client(proxy)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="orphan", messages=MESSAGES)
    assert unavailable.value.status_code in (502, 503)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_errors_map_to_openai_400(proxy, engine):
    client = sync_client(proxy)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=f"m-{engine}", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=10
        )
    assert error.value.status_code == 400
    assert error.value.body["message"]


# ----- routing, readiness, metrics ---------------------------------------------------------------
async def test_round_robin_spreads_over_backends(proxy, fleet):
    async def served(name: str) -> int:
        _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
        return sum(json.loads(raw)["finished"].values())

    before = {name: await served(name) for name in ("rr-a", "rr-b")}
    for _ in range(6):
        status, _, _ = await post_json(
            proxy.url + "/v1/completions", {"model": "shared", "prompt": "a", "max_tokens": 2}
        )
        assert status == 200
    after = {name: await served(name) for name in ("rr-a", "rr-b")}
    assert {name: after[name] - before[name] for name in after} == {"rr-a": 3, "rr-b": 3}


async def test_models_health_ready_metrics(proxy):
    _, raw, _ = await get(proxy.url + "/v1/models")
    assert [m["id"] for m in json.loads(raw)["data"]] == sorted(["m-vllm", "m-tgi", "m-sglang", "shared", "orphan"])
    status, _, _ = await get(proxy.url + "/health")
    assert status == 200
    status, raw, _ = await get(proxy.url + "/ready")
    assert status == 200 and "dead" not in json.loads(raw)["healthy_backends"]
    _, raw, _ = await get(proxy.url + "/metrics")
    samples = metric_samples(raw.decode())
    healthy = {labels["backend"]: v for labels, v in samples["sloproxy_backend_healthy"]}
    assert healthy["dead"] == 0.0 and healthy["vllm"] == 1.0
    assert "sloproxy_requests_total" in samples and "sloproxy_request_duration_seconds_bucket" in samples
    await asyncio.sleep(1.2)  # load polling runs every second
    _, raw, _ = await get(proxy.url + "/metrics")
    stale = {labels["backend"]: v for labels, v in metric_samples(raw.decode())["sloproxy_backend_load_stale"]}
    assert stale["vllm"] == 0.0 and stale["dead"] == 1.0


# ----- cancellation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_client_disconnect_aborts_in_engine(proxy, fleet, engine):
    async def aborted() -> float:
        _, raw, _ = await get(fleet.url(engine) + "/_emulator/state")
        return json.loads(raw)["finished"].get("abort", 0)

    before = await aborted()
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy.url + "/v1/chat/completions",
            json={"model": f"m-{engine}", "messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "stream": True},
        )
        await response.content.readline()
        gone = time.monotonic()
        response.close()
    while await aborted() == before:
        assert time.monotonic() - gone < 2.0, "the engine never saw the abort"
        await asyncio.sleep(0.01)
    _, raw, _ = await get(fleet.url(engine) + "/_emulator/state")
    assert json.loads(raw)["running"] == 0
