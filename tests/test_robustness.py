"""Regressions from review: ids, SSE framing, close-delimited bodies, bad stream events, bad weights."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from sloproxy.adapters.vllm import VLLMAdapter
from sloproxy.forward import _translate
from sloproxy.plugins import load_policy
from sloproxy.request import parse_request
from sloproxy.sse import SSEDecoder
from sloproxy.upstream import UpstreamPool

BODY = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})


def test_client_request_ids_never_become_internal_keys():
    first, second = parse_request("chat", BODY, "same-id"), parse_request("chat", BODY, "same-id")
    assert first.id != second.id
    assert first.client_request_id == second.client_request_id == "same-id"


def test_sse_crlf_split_across_reads_keeps_a_multiline_event_whole():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: A\r") == []
    assert decoder.feed(b"\ndata: B\r\n\r\n") == [b"A\nB"]
    assert decoder.feed(b"data:C\n\ndata: D\n\n") == [b"C", b"D"]


async def test_body_delimited_by_connection_close_is_complete():
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        pool = UpstreamPool(f"http://127.0.0.1:{port}")
        response = await pool.request("GET", "/")
        assert await response.read() == b"hello"
        response.release()
        pool.close()


def test_an_unreadable_stream_event_ends_with_an_error_frame():
    request = parse_request("chat", BODY)
    translator = VLLMAdapter().stream_translator(request)
    out = _translate(translator, b'{"choices":[],"usage":{"prompt_tokens":null}}')  # usage the adapter cannot read
    frames = out.split(b"\n\n")
    assert json.loads(frames[0][6:])["error"]["code"] is None and frames[1] == b"data: [DONE]"
    assert translator.failed and translator.failure.status == 502


@pytest.mark.parametrize(
    "params", [{"quantum_tokens": 0}, {"tenant_weights": {"a": 0.0}}, {"tenant_weights": {"a": -1}}]
)
def test_priority_fair_refuses_weights_that_would_never_earn_credit(params):
    with pytest.raises(ValueError, match="priority-fair"):
        load_policy("priority-fair", params)
