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
from sloproxy.upstream import UpstreamPool, UpstreamTimeout

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


async def _chunked_server(gaps: list[float]):
    """A server answering one chunked reply: a chunk after each of ``gaps`` seconds, then the end."""

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for gap in gaps:
            await asyncio.sleep(gap)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _pool(server) -> UpstreamPool:
    return UpstreamPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")


async def _after_first_chunk(pool: UpstreamPool, timeout: float):
    """The reply (at ``timeout``), once its first chunk came."""
    response = await pool.request("GET", "/", timeout=timeout)
    assert await response.next_chunk() == b"x"
    return response


async def test_a_stream_caller_resumes_at_its_first_body_bytes_and_their_silence_is_timed():
    """``wait_body``: the head alone does not resume the caller (one wake-up per stream start, not
    two); the first bytes do, and a head followed by silence fails on the timeout."""
    loop = asyncio.get_running_loop()
    for wait_body, resumed_after in ((False, 0.0), (True, 0.2)):
        server = await _chunked_server([0.2])
        async with server:
            pool = _pool(server)
            started = loop.time()
            response = await pool.request("GET", "/", timeout=5.0, wait_body=wait_body)
            waited = loop.time() - started
            assert response.status == 200
            assert resumed_after <= waited < resumed_after + 0.15
            assert await response.read() == b"x"
            response.release()
            pool.close()
    server = await _chunked_server([0.5])
    async with server:
        pool = _pool(server)
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", "/", timeout=0.2, wait_body=True)
        pool.close()


async def test_an_upstream_times_out_on_silence_not_on_the_length_of_its_reply():
    """The timeout is seconds without data: a reply whose chunks come 0.1 s apart for 0.6 s passes a
    0.25 s timeout; one that goes silent for 0.5 s fails after about 0.25 s of that silence."""
    server = await _chunked_server([0.1] * 6)
    async with server:
        pool = _pool(server)
        response = await pool.request("GET", "/", timeout=0.25)
        assert await response.read() == b"x" * 6
        response.release()
        pool.close()
    server = await _chunked_server([0.05, 0.5])
    async with server:
        pool = _pool(server)
        response = await _after_first_chunk(pool, 0.25)
        silent_since = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await response.next_chunk()
        assert asyncio.get_running_loop().time() - silent_since >= 0.2  # (the data itself was 0.5 s away)
        response.close()
        pool.close()


async def test_a_shorter_timeout_set_mid_reply_applies_to_the_next_wait():
    """The stream pace replaces the first-byte timeout once the first event came (forward.py)."""
    server = await _chunked_server([0.05, 1.0])
    async with server:
        pool = _pool(server)
        response = await _after_first_chunk(pool, 5.0)
        response.timeout = 0.2
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await response.next_chunk()
        assert asyncio.get_running_loop().time() - started < 0.9  # the data itself was ~1 s away
        response.close()
        pool.close()
