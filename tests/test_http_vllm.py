"""vLLM emulator fidelity over real HTTP: shapes, frames, errors, admin routes, metrics."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.helpers import get, metric_samples, metric_types, post_json, sse_events, stream_raw

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Say something."}]}


async def test_chat_non_stream_shape(fleet):
    status, body, _ = await post_json(fleet.url("vllm") + "/v1/chat/completions", {**CHAT, "max_tokens": 7})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "llama-3-8b"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert "stop_reason" in choice
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 7


async def test_chat_stream_frames(fleet):
    status, raw = await stream_raw(
        fleet.url("vllm") + "/v1/chat/completions",
        {**CHAT, "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"]]
    assert len(content) == 1 + 5  # role chunk + one chunk per token
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 5 + ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("stream_options", "expect_usage"),
    [(None, False), ({}, False), ({"include_usage": False}, False), ({"include_usage": True}, True)],
)
async def test_usage_chunk_rules(fleet, stream_options, expect_usage):
    body = {**CHAT, "max_tokens": 2, "stream": True}
    if stream_options is not None:
        body["stream_options"] = stream_options
    _, raw = await stream_raw(fleet.url("vllm") + "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert any("usage" in c and c["choices"] == [] for c in chunks) is expect_usage


async def test_completions_and_request_id_header(fleet):
    status, body, _ = await post_json(
        fleet.url("vllm") + "/v1/completions",
        {"model": "llama-3-8b", "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True},
        headers={"X-Request-Id": "abc123"},
    )
    assert status == 200
    assert body["id"] == "cmpl-abc123"
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]


async def test_unknown_model_is_404_nested(fleet):
    status, body, _ = await post_json(fleet.url("vllm") + "/v1/chat/completions", {**CHAT, "model": "gpt-5"})
    assert status == 404
    assert body["error"]["type"] == "NotFoundError"
    assert body["error"]["code"] == 404
    assert body["error"]["param"] == "model"
    assert "gpt-5" in body["error"]["message"]


async def test_legacy_flat_error_body(fleet):
    status, body, _ = await post_json(fleet.url("vllm-legacy") + "/v1/chat/completions", {**CHAT, "model": "x"})
    assert status == 404
    assert body["object"] == "error"
    assert body["code"] == 404


async def test_context_overflow_is_400(fleet):
    long_prompt = "word " * 5000  # > max_model_len 4096
    status, body, _ = await post_json(
        fleet.url("vllm") + "/v1/completions", {"model": "llama-3-8b", "prompt": long_prompt, "max_tokens": 10}
    )
    assert status == 400
    assert "maximum context length is 4096 tokens" in body["error"]["message"]
    assert body["error"]["param"] == "input_tokens"
    status, body, _ = await post_json(
        fleet.url("vllm") + "/v1/completions", {"model": "llama-3-8b", "prompt": "hi", "max_tokens": 5000}
    )
    assert status == 400  # max_tokens alone over the window
    assert body["error"]["type"] == "BadRequestError"
    # prompt + max_tokens over the window but max_tokens alone within it: clamped, not refused
    status, body, _ = await post_json(
        fleet.url("vllm") + "/v1/completions",
        {"model": "llama-3-8b", "prompt": [1] * 4000, "max_tokens": 4000, "ignore_eos": True},
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 96


async def test_bad_json_and_types_are_400(fleet):
    url = fleet.url("vllm") + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{not json") as response:
        assert response.status == 400
        assert "error" in await response.json()
    status, _body, _ = await post_json(fleet.url("vllm") + "/v1/chat/completions", {**CHAT, "max_tokens": "ten"})
    assert status == 400
    status, body, _ = await post_json(fleet.url("vllm") + "/v1/chat/completions", {"model": "llama-3-8b"})
    assert status == 400
    assert (body["error"]["type"], body["error"]["param"]) == ("Bad Request", "body.messages")


async def test_priority_is_ignored_under_fcfs(fleet):
    """vLLM 0.33 ignores a non-zero priority without priority scheduling (0.11 refused it: see
    tests/test_contract_vllm.py for the engine_version that keeps that)."""
    status, _, _ = await post_json(fleet.url("vllm") + "/v1/chat/completions", {**CHAT, "priority": 3, "max_tokens": 2})
    assert status == 200
    status, _, _ = await post_json(
        fleet.url("vllm-legacy") + "/v1/chat/completions", {**CHAT, "priority": 3, "max_tokens": 2}
    )
    assert status == 200


async def test_models_health_version_tokenize(fleet):
    status, raw, _ = await get(fleet.url("vllm") + "/v1/models")
    models = json.loads(raw)
    assert status == 200 and models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "llama-3-8b" and card["owned_by"] == "vllm" and card["max_model_len"] == 4096
    assert card["permission"][0]["object"] == "model_permission"
    status, raw, _ = await get(fleet.url("vllm") + "/health")
    assert status == 200 and raw == b""
    status, raw, _ = await get(fleet.url("vllm") + "/version")
    assert json.loads(raw) == {"version": "0.33.0"}
    status, body, _ = await post_json(fleet.url("vllm") + "/tokenize", {"prompt": "Hello world, hello!"})
    assert status == 200
    assert body["count"] == len(body["tokens"]) == 5
    assert body["max_model_len"] == 4096


async def test_lora_load_list_unload(fleet):
    url = fleet.url("vllm")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/l"}) as r:
            assert r.status == 200
            assert await r.text() == "Success: LoRA adapter 'sql' added successfully."
        async with session.post(url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/l"}) as r:
            assert r.status == 400
        async with session.get(url + "/v1/models") as r:
            cards = {c["id"]: c for c in (await r.json())["data"]}
        assert cards["sql"]["parent"] == "llama-3-8b"
        status, body, _ = await post_json(url + "/v1/chat/completions", {**CHAT, "model": "sql", "max_tokens": 2})
        assert status == 200 and body["model"] == "sql"
        async with session.post(url + "/v1/unload_lora_adapter", json={"lora_name": "sql"}) as r:
            assert r.status == 200
        async with session.get(url + "/v1/models") as r:
            assert [c["id"] for c in (await r.json())["data"]] == ["llama-3-8b"]


async def test_sleep_and_wake(fleet):
    url = fleet.url("vllm-legacy")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/sleep?level=1") as r:
            assert r.status == 200
            assert await r.json() == {"status": "sleeping", "level": 1}
        async with session.get(url + "/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": True}
        # A request sent while asleep waits and completes after wake-up.
        pending = asyncio.ensure_future(post_json(url + "/v1/chat/completions", {**CHAT, "max_tokens": 2}))
        await asyncio.sleep(0.2)
        assert not pending.done()
        metrics = await (await session.get(url + "/metrics")).text()
        states = {s[0]["sleep_state"]: s[1] for s in metric_samples(metrics)["vllm:engine_sleep_state"]}
        assert states["weights_offloaded"] == 1.0
        async with session.post(url + "/wake_up") as r:
            assert r.status == 200
            assert await r.json() == {"status": "awake", "tags": None}
        status, _, _ = await asyncio.wait_for(pending, 10)
        assert status == 200
        async with session.get(url + "/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": False}


async def test_metrics_names_and_labels(fleet):
    await post_json(fleet.url("vllm") + "/v1/chat/completions", {**CHAT, "max_tokens": 3})
    _status, raw, _ = await get(fleet.url("vllm") + "/metrics")
    text = raw.decode()
    samples = metric_samples(text)
    types = metric_types(text)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert types[gauge] == "gauge"
        assert samples[gauge][0][0] == {"model_name": "llama-3-8b", "engine": "0"}
    for counter in (
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
    ):
        assert types[counter] == "counter"
        assert counter + "_total" in samples
    reasons = {labels["finished_reason"] for labels, _ in samples["vllm:request_success_total"]}
    assert reasons == {"stop", "length", "abort"}
    info = samples["vllm:cache_config_info"][0][0]
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) > 1000
    assert int(info["kv_cache_size_tokens"]) == 16 * int(info["num_gpu_blocks"])
    assert "vllm:gpu_cache_usage_perc" not in samples
    for hist in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ):
        assert types[hist] == "histogram"
        assert samples[hist + "_count"][0][1] >= 1


async def test_client_disconnect_aborts(fleet):
    url = fleet.url("vllm")

    async def aborted() -> float:
        _, raw, _ = await get(url + "/metrics")
        return {s[0]["finished_reason"]: s[1] for s in metric_samples(raw.decode())["vllm:request_success_total"]}[
            "abort"
        ]

    before = await aborted()
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            url + "/v1/chat/completions", json={**CHAT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        )
        await response.content.readline()  # the stream has started
        response.close()  # client goes away mid-stream
    for _ in range(50):
        if await aborted() == before + 1:
            break
        await asyncio.sleep(0.05)
    assert await aborted() == before + 1
    _, raw, _ = await get(url + "/_emulator/state")
    assert json.loads(raw)["running"] == 0


async def test_official_openai_client(fleet):
    client = openai.AsyncOpenAI(base_url=fleet.url("vllm") + "/v1", api_key="x")
    reply = await client.chat.completions.create(model="llama-3-8b", messages=CHAT["messages"], max_tokens=4)
    assert reply.choices[0].message.content
    text = ""
    stream = await client.completions.create(model="llama-3-8b", prompt="Hi", max_tokens=4, stream=True)
    async for chunk in stream:
        text += chunk.choices[0].text
    assert len(text) > 0
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=CHAT["messages"])
    await client.close()


async def test_role_chunk_comes_with_the_first_token_not_on_acceptance(fleet):
    """vLLM sends the role chunk on its first engine output (after prefill), so a proxy that sees it
    knows the request really started; sent on acceptance it would look started while still queued."""
    import time

    prompt = "word " * 3000  # a long prefill: milliseconds of emulated time before the first token
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": prompt}], "stream": True}
    body.update(max_tokens=3, ignore_eos=True)
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(fleet.url("vllm") + "/v1/chat/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    arrivals.append((time.perf_counter() - started, line))
    role_at, role = arrivals[0]
    first_token_at, first = arrivals[1]
    assert b'"role":"assistant"' in role.replace(b" ", b"") and b'"content":""' in role.replace(b" ", b"")
    assert b'"content":"' in first and first_token_at - role_at < 0.5 * first_token_at
