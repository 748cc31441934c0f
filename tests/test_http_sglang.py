"""SGLang emulator fidelity over real HTTP: /generate cumulative stream, abort, admin routes, metrics."""

from __future__ import annotations

import asyncio
import itertools
import json

import aiohttp
import openai

from tests.helpers import get, metric_samples, metric_types, post_json, sse_events, stream_raw


async def test_generate_non_stream_meta_info(fleet):
    status, body, _ = await post_json(
        fleet.url("sglang") + "/generate",
        {
            "text": "The capital of France is",
            "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
            "rid": "r-1",
        },
    )
    assert status == 200
    meta = body["meta_info"]
    assert meta["id"] == "r-1"
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["completion_tokens"] == 5 == len(body["output_ids"])
    assert meta["prompt_tokens"] == 6  # The| capit|al| of| France| is
    assert meta["e2e_latency"] > 0
    assert "cached_tokens" in meta


async def test_generate_stream_is_cumulative(fleet):
    status, raw = await stream_raw(
        fleet.url("sglang") + "/generate",
        {"text": "Count:", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}, "stream": True},
    )
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    texts = [f["text"] for f in frames]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert frames[-1]["meta_info"]["completion_tokens"] == 4
    assert frames[-1]["meta_info"]["finish_reason"]["type"] == "length"


async def test_chat_stream_separate_finish_chunk(fleet):
    _, raw = await stream_raw(
        fleet.url("sglang") + "/v1/chat/completions",
        {
            "model": "qwen-7b",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": True,
        },
    )
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {"reasoning_content": None}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "matched_stop" in chunks[0]["choices"][0]


async def test_abort_request_ends_running_generation(fleet):
    url = fleet.url("sglang")
    job = asyncio.ensure_future(
        post_json(
            url + "/generate",
            {"text": "go", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}, "rid": "long-1"},
        )
    )
    await asyncio.sleep(0.3)
    status, _, _ = await post_json(url + "/abort_request", {"rid": "long-1"})
    assert status == 200
    status, body, _ = await asyncio.wait_for(job, 10)
    assert body["meta_info"]["finish_reason"]["type"] == "abort"
    assert body["meta_info"]["completion_tokens"] < 3000
    _, raw, _ = await get(url + "/metrics")
    assert metric_samples(raw.decode())["sglang:num_aborted_requests_total"][0][1] >= 1


async def test_flush_cache_refused_while_running(fleet):
    url = fleet.url("sglang")
    job = asyncio.ensure_future(
        post_json(
            url + "/generate",
            {"text": "go", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}},
        )
    )
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/flush_cache") as response:
            assert response.status == 400
        await job
        async with session.post(url + "/flush_cache") as response:
            assert response.status == 200
            assert (await response.text()).startswith("Cache flushed.")


async def test_context_overflow_and_info_routes(fleet):
    url = fleet.url("sglang")
    status, body, _ = await post_json(url + "/generate", {"text": "word " * 5000})
    assert status == 400
    assert "longer than the model's context length (4096 tokens)" in body["error"]["message"]
    status, body, _ = await post_json(
        url + "/v1/chat/completions", {"model": "qwen-7b", "messages": [{"role": "user", "content": "a " * 5000}]}
    )
    assert status == 400 and body["object"] == "error" and body["code"] == 400
    for route in ("/get_model_info", "/model_info"):
        _, raw, _ = await get(url + route)
        info = json.loads(raw)
        assert info["model_path"] == "qwen-7b" and info["is_generation"] is True and "context_length" not in info
    for route in ("/get_server_info", "/server_info"):
        status, raw, _ = await get(url + route)
        info = json.loads(raw)
        assert status == 200 and info["context_length"] == 4096 and info["max_req_input_len"] == 4090
    assert (await get(url + "/get_load"))[0] == 404
    _, raw, _ = await get(url + "/v1/loads")
    load = json.loads(raw)["loads"]
    assert {"num_running_reqs", "num_waiting_reqs", "num_used_tokens", "num_total_tokens"} <= set(load[0])
    status, _, _ = await get(url + "/health_generate")
    assert status == 200


async def test_release_and_resume_memory(fleet):
    url = fleet.url("sglang")
    status, _, _ = await post_json(url + "/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
    assert status == 200
    _, raw, _ = await get(url + "/_emulator/state")
    assert json.loads(raw)["sleeping"] is True
    status, _, _ = await post_json(url + "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})
    assert status == 200
    _, raw, _ = await get(url + "/_emulator/state")
    assert json.loads(raw)["sleeping"] is False


async def test_metrics_names(fleet):
    await post_json(fleet.url("sglang") + "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    _, raw, _ = await get(fleet.url("sglang") + "/metrics")
    text = raw.decode()
    types = metric_types(text)
    samples = metric_samples(text)
    for gauge in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:num_used_tokens",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:gen_throughput",
    ):
        assert types[gauge] == "gauge"
        assert samples[gauge][0][0] == {
            "model_name": "qwen-7b",
            "engine_type": "unified",
            "tp_rank": "0",
            "pp_rank": "0",
            "moe_ep_rank": "0",
        }
    for counter in ("sglang:prompt_tokens", "sglang:generation_tokens", "sglang:num_aborted_requests"):
        assert types[counter] == "counter"
    for hist in (
        "sglang:time_to_first_token_seconds",
        "sglang:inter_token_latency_seconds",
        "sglang:e2e_request_latency_seconds",
        "sglang:queue_time_seconds",
    ):
        assert types[hist] == "histogram"


async def test_official_openai_client_against_sglang(fleet):
    client = openai.AsyncOpenAI(base_url=fleet.url("sglang") + "/v1", api_key="x")
    stream = await client.chat.completions.create(
        model="qwen-7b",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish, usage = None, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 3
    await client.close()
