"""Adapters in isolation: engine error bodies become OpenAI errors; streams are translated exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from sloproxy.adapters.openai_compat import OpenAICompatibleAdapter
from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.adapters.tgi import TGIAdapter
from sloproxy.adapters.vllm import VLLMAdapter
from sloproxy.forward import _relay_events, _translate
from sloproxy.processes import ProxyProcess, free_port
from sloproxy.request import parse_request
from sloproxy.sse import SSEDecoder
from tests.helpers import get, metric_samples, sse_events, stream_raw


def chat_request(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request("chat", msgspec.json.encode(body))


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "message"),
    [
        (
            400,
            {"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}},
            400,
            "too long",
        ),
        (
            404,
            {
                "object": "error",
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            },
            404,
            "The model `x` does not exist.",
        ),
        (500, {"error": {"message": "boom", "code": 503}}, 503, "boom"),
        (502, b"<html>bad gateway</html>", 502, "The backend failed with HTTP 502."),
    ],
)
def test_vllm_and_sglang_error_bodies(status, body, expected_status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    for adapter in (VLLMAdapter(), SGLangAdapter()):
        error = adapter.translate_error(status, raw)
        assert (error.status, error.message) == (expected_status, message)
        rendered = json.loads(error.body())
        assert set(rendered["error"]) == {"message", "type", "param", "code"}
        assert rendered["error"]["code"] is None or isinstance(rendered["error"]["code"], str)


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_type"),
    [
        (
            422,
            {
                "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096",
                "error_type": "validation",
            },
            400,
            "invalid_request_error",
        ),
        (429, {"error": "Model is overloaded", "error_type": "overloaded"}, 429, "rate_limit_error"),
        (424, {"error": "Request failed during generation", "error_type": "generation"}, 500, "server_error"),
        (503, {"error": "unhealthy", "error_type": "healthcheck"}, 503, "service_unavailable_error"),
    ],
)
def test_tgi_error_bodies(status, body, expected_status, expected_type):
    error = TGIAdapter().translate_error(status, json.dumps(body).encode())
    assert error.status == expected_status
    assert json.loads(error.body())["error"]["type"] == expected_type
    assert error.message == body["error"]


def test_vllm_stream_passes_bytes_and_strips_the_usage_it_asked_for():
    request = chat_request(stream=True)
    call = VLLMAdapter().build(request)
    assert json.loads(call.body)["stream_options"] == {"include_usage": True}
    assert call.headers["X-Request-Id"] == request.id
    translator = VLLMAdapter().stream_translator(request)
    content = b'{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
    assert translator.feed(content) == b"data: " + content + b"\n\n"
    usage = b'{"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    assert translator.feed(usage) == b""
    assert (request.prompt_tokens, request.completion_tokens) == (3, 1)
    assert translator.feed(b"[DONE]") == b"data: [DONE]\n\n" and translator.done


def test_plain_token_events_are_marked_for_forwarding_unchanged_and_the_rest_are_not():
    request = chat_request(stream=True)
    translator = VLLMAdapter().stream_translator(request)
    content = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"say \\"error\\""}}]}\n\n'
    assert not translator.unchanged(content)  # the first event is always parsed (garbage fails before a byte)
    translator.feed(content[len(b"data: ") : -2])
    assert translator.unchanged(content * 3)
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    assert not translator.unchanged(content + usage)
    assert not translator.unchanged(content + b"data: [DONE]\n\n")
    assert not translator.unchanged(b'data: {"error":{"message":"x"}}\n\n')
    assert not translator.unchanged(b": keep-alive comment\n\n")
    assert not TGIAdapter().stream_translator(request).unchanged(content)  # TGI's chunks are always rewritten


def test_runs_of_plain_events_pass_as_they_are_up_to_the_first_that_needs_a_look():
    request = chat_request(stream=True)
    translator = VLLMAdapter().stream_translator(request)
    content = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    done = b"data: [DONE]\n\n"
    assert translator.unchanged_until(content * 3) == 0  # nothing passes before the first event was parsed
    translator.feed(content[len(b"data: ") : -2])
    assert translator.unchanged_until(content * 3) == 3 * len(content)
    assert translator.unchanged_until(content * 2 + usage + done) == 2 * len(content)
    assert translator.unchanged_until(content + done) == len(content)
    assert translator.unchanged_until(usage + content) == 0
    assert translator.unchanged_until(usage + content * 2 + done, len(usage)) == len(usage) + 2 * len(content)
    assert translator.unchanged_until(b": keep-alive\n\n" + content) == 0
    tgi = TGIAdapter().stream_translator(request)
    assert tgi.unchanged_until(content * 2) == 0  # TGI's chunks are always rewritten


def test_a_read_of_many_events_is_relayed_as_splitting_every_event_would():
    content = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    usage = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    read = content * 3 + usage + content + b"data: [DONE]\n\n"
    for include_usage in (False, True):
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        relayed, split = chat_request(stream=True, **options), chat_request(stream=True, **options)
        out = _relay_events(VLLMAdapter().stream_translator(relayed), SSEDecoder(), read)
        translator = VLLMAdapter().stream_translator(split)
        expected = b"".join(_translate(translator, payload) for payload in SSEDecoder().feed(read))
        assert out == expected and (relayed.completion_tokens, split.completion_tokens) == (4, 4)
        assert (b'"usage"' in out) == include_usage and out.endswith(b"data: [DONE]\n\n")


async def test_a_burst_of_events_reaches_the_client_whole_with_usage_only_when_asked():
    """Through a proxy: after the first event, a read holding tokens, usage and ``[DONE]`` passes its
    tokens as they are and translates its tail; the usage the proxy asked for is dropped unless the
    client asked too, and the proxy learns the true counts either way."""
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(Path(__file__).with_name("burst_backend.py")), str(port), "6"])
    try:
        config = {"backends": [{"name": "b", "engine": "vllm", "url": f"http://127.0.0.1:{port}", "models": ["m"]}]}
        with ProxyProcess(config) as proxy:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            status, raw = await stream_raw(proxy.url + "/v1/chat/completions", body)
            assert status == 200
            events = sse_events(raw)
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [f"t{i}" for i in range(6)]
            assert events[-1] == b"[DONE]"
            body["stream_options"] = {"include_usage": True}
            status, raw = await stream_raw(proxy.url + "/v1/chat/completions", body)
            events = sse_events(raw)
            assert status == 200 and len(events) == 8 and events[-1] == b"[DONE]"
            assert json.loads(events[-2])["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
            _, metrics, _ = await get(proxy.url + "/metrics")
            completion = metric_samples(metrics.decode())["sloproxy_tokens_total"]
            assert {"model": "m", "kind": "completion"} in [labels for labels, _ in completion]
            assert sum(v for labels, v in completion if labels.get("kind") == "completion") == 12
    finally:
        backend.terminate()
        backend.wait(timeout=10)


def test_a_first_stream_event_that_is_not_json_is_refused():
    translator = VLLMAdapter().stream_translator(chat_request(stream=True))
    with pytest.raises(msgspec.DecodeError):
        translator.feed(b"\x00garbage, not JSON")


def test_usage_chunk_kept_when_the_client_asked():
    request = chat_request(stream=True, stream_options={"include_usage": True})
    assert VLLMAdapter().build(request).body == request.raw  # nothing to change: bytes pass as sent
    usage = b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
    assert VLLMAdapter().stream_translator(request).feed(usage) == b"data: " + usage + b"\n\n"


def test_stream_error_frame_becomes_openai_error_then_done():
    request = chat_request(stream=True)
    translator = VLLMAdapter().stream_translator(request)
    out = translator.feed(b'{"error":{"message":"engine died","type":"InternalServerError","code":500}}')
    frames = out.split(b"\n\n")
    assert json.loads(frames[0][6:])["error"]["message"] == "engine died"
    assert frames[1] == b"data: [DONE]" and translator.failed and translator.done


def test_sglang_gets_a_rid_per_attempt_and_an_abort_call():
    request = chat_request(stream=True)
    request.attempts = 1
    adapter = SGLangAdapter()
    assert json.loads(adapter.build(request).body)["rid"] == f"{request.id}-1"
    abort = adapter.abort_call(request)
    assert abort.path == "/abort_request" and json.loads(abort.body) == {"rid": f"{request.id}-1"}
    request.attempts = 2  # a retry must not collide with the first attempt's late abort
    assert json.loads(adapter.build(request).body)["rid"] == f"{request.id}-2"
    assert VLLMAdapter().abort_call(request) is None  # closing the connection aborts in vLLM


def test_tgi_stream_is_normalised():
    request = chat_request(model="llama", stream=True)
    body = json.loads(TGIAdapter().build(request).body)
    assert body["model"] == "tgi" and body["stream_options"]["include_usage"] is True
    translator = TGIAdapter().stream_translator(request)
    tgi_chunk = {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 1,
        "model": "meta/llama",
        "system_fingerprint": "3.3.4-native",
        "usage": None,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "logprobs": None, "finish_reason": None}
        ],
    }
    frames = [json.loads(f[6:]) for f in translator.feed(json.dumps(tgi_chunk).encode()).split(b"\n\n") if f]
    assert [f["choices"][0]["delta"] for f in frames] == [{"role": "assistant", "content": ""}, {"content": "Hel"}]
    assert all(f["id"] == f"chatcmpl-{request.id}" and f["model"] == "llama" for f in frames)
    assert all("system_fingerprint" not in f for f in frames)
    tgi_chunk["choices"][0]["delta"] = {"role": "assistant", "content": "lo"}
    frame = json.loads(translator.feed(json.dumps(tgi_chunk).encode())[6:])
    assert frame["choices"][0]["delta"] == {"content": "lo"}
    error = translator.feed(b'{"error":{"message":"bad","http_status_code":422}}')
    assert json.loads(error.split(b"\n\n")[0][6:])["error"]["type"] == "invalid_request_error"


def test_openai_backend_sends_the_api_key():
    call = OpenAICompatibleAdapter(api_key="sk-test").build(chat_request())
    assert call.headers["Authorization"] == "Bearer sk-test"
    assert OpenAICompatibleAdapter.health_path == "/v1/models"
