"""TGI emulator fidelity over real HTTP: native routes, SSE framing, errors, 429, metrics."""

from __future__ import annotations

import asyncio
import json

import openai

from tests.conftest import LONG_PROMPT
from tests.helpers import get, metric_samples, metric_types, post_json, sse_events, stream_raw


async def test_generate_shape_and_timing_headers(fleet):
    status, body, headers = await post_json(
        fleet.url("tgi") + "/generate",
        {"inputs": "What is deep learning?", "parameters": {"max_new_tokens": 6, "details": True}},
    )
    assert status == 200
    assert isinstance(body["generated_text"], str)
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 6
    for header in (
        "x-compute-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-prompt-tokens",
        "x-generated-tokens",
    ):
        assert header in {k.lower() for k in headers}
    assert headers["x-prompt-tokens"] == "6"


async def test_generate_stream_frames_without_done(fleet):
    status, raw = await stream_raw(
        fleet.url("tgi") + "/generate_stream",
        {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 4, "details": True}},
    )
    assert status == 200
    events = [json.loads(e) for e in sse_events(raw)]  # "data: " since TGI 2.1 (axum 0.7)
    assert b"[DONE]" not in raw
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] == 4
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}


async def test_validation_error_422(fleet):
    # Only input + min(max_new_tokens, 1024) is checked against max_total_tokens (4096 here).
    status, body, _ = await post_json(
        fleet.url("tgi") + "/generate", {"inputs": "hi " * 20, "parameters": {"max_new_tokens": 100000}}
    )
    assert status == 200
    status, body, _ = await post_json(
        fleet.url("tgi") + "/generate", {"inputs": " x" * 3500, "parameters": {"max_new_tokens": 2000}}
    )
    assert status == 422
    assert body["error_type"] == "validation"
    assert body["error"] == (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
        "Given: 3500 `inputs` tokens and 1024 `max_new_tokens`"
    )
    status, body, _ = await post_json(fleet.url("tgi") + "/generate", {"inputs": "", "parameters": {}})
    assert status == 422 and body["error_type"] == "validation"
    status, body, _ = await post_json(fleet.url("tgi") + "/generate", {"parameters": {}})
    assert status == 422 and body.startswith("Failed to deserialize the JSON body")  # axum: plain text


async def test_overloaded_429_past_max_concurrent_requests(fleet):
    url = fleet.url("tgi") + "/generate"
    long = {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2000}}
    # max_concurrent_requests is 4 in this fleet: the fifth in flight is refused at once.
    busy = [asyncio.ensure_future(post_json(url, long)) for _ in range(4)]
    await asyncio.sleep(0.3)
    status, body, _ = await post_json(url, {"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert status == 429
    assert body == {"error": "Model is overloaded", "error_type": "overloaded"}
    # Inside a stream the same refusal arrives as an event with HTTP 200.
    status, raw = await stream_raw(fleet.url("tgi") + "/generate_stream", {"inputs": "x"})
    assert status == 200
    assert json.loads(sse_events(raw)[0])["error_type"] == "overloaded"
    results = await asyncio.gather(*busy)
    assert [r[0] for r in results] == [200] * 4
    # Not the natural 3000: two 1024-token rounds, each asking for min(2000, 1024) again.
    assert all(r[1]["generated_text"].count(" ") == 2048 for r in results)
    _, raw, _ = await get(fleet.url("tgi") + "/metrics")
    failures = {labels["err"]: value for labels, value in metric_samples(raw.decode())["tgi_request_failure_total"]}
    assert failures["overloaded"] >= 2


async def test_openai_chat_stream_dialect(fleet):
    status, raw = await stream_raw(
        fleet.url("tgi") + "/v1/chat/completions",
        {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    )
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert next(iter(chunks[0])) == "object"
    assert all(c["id"] == "" and c["model"] == "llama-3-8b" for c in chunks)
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    assert all(c["usage"] is None for c in chunks)  # include_usage defaults to false: no usage chunk
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def test_info_models_health(fleet):
    status, raw, _ = await get(fleet.url("tgi") + "/info")
    info = json.loads(raw)
    assert status == 200
    for field in (
        "model_id",
        "max_concurrent_requests",
        "max_input_tokens",
        "max_total_tokens",
        "max_best_of",
        "max_stop_sequences",
        "max_client_batch_size",
        "version",
    ):
        assert field in info
    assert info["max_concurrent_requests"] == 4
    status, raw, _ = await get(fleet.url("tgi") + "/v1/models")
    assert json.loads(raw)["data"][0]["id"] == "llama-3-8b"
    status, raw, _ = await get(fleet.url("tgi") + "/health")
    assert status == 200


async def test_metrics_names(fleet):
    await post_json(fleet.url("tgi") + "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    _, raw, _ = await get(fleet.url("tgi") + "/metrics")
    text = raw.decode()
    types = metric_types(text)
    samples = metric_samples(text)
    for gauge in (
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_batch_max_total_tokens",
    ):
        assert types[gauge] == "gauge"
        assert samples[gauge][0][0] == {}  # TGI exports no model label
    # TGI's exporter writes counters without a _total suffix (the parser adds it back).
    assert "\ntgi_request_count " in text and "\ntgi_request_success " in text
    assert "tgi_request_count_total" not in text
    assert types["tgi_request_count"] == "counter" and samples["tgi_request_success_total"][0][1] >= 1
    for hist in (
        "tgi_request_duration",
        "tgi_request_queue_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_generated_tokens",
    ):
        assert types[hist] == "histogram"


async def test_official_openai_client_against_tgi(fleet):
    client = openai.AsyncOpenAI(base_url=fleet.url("tgi") + "/v1", api_key="x")
    reply = await client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 3
    await client.close()
