"""The proxy's own HTTP/1.1 server, spoken to over raw sockets (what clients can really send)."""

from __future__ import annotations

import asyncio
import json

import pytest

from sloproxy.errors import ProxyError
from sloproxy.http_server import HeaderLines, HTTPServer, Request, Response


async def echo(request: Request, response: Response) -> None:
    body = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "size": len(request.body),
        "class": request.headers.get("X-SLO-Class"),
    }
    response.send(200, json.dumps(body).encode())


async def refuse(request: Request, response: Response) -> None:
    raise ProxyError(429, "slow down", headers={"Retry-After": "2"})


async def crash(request: Request, response: Response) -> None:
    raise RuntimeError("bug")


class Streamer:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.chunks = 3
        self.written = 0

    async def __call__(self, request: Request, response: Response) -> None:
        response.start(200, "text/event-stream")
        try:
            for index in range(self.chunks):
                await response.write(b"data: %d\n\n" % index)
                self.written += 1
                await asyncio.sleep(0.01)
            await response.end()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def stream_ending_with_data(request: Request, response: Response) -> None:
    """A stream with pre-rendered header lines whose last events leave with its end."""
    response.start(200, "text/event-stream", HeaderLines.of({"X-Extra": "1\r\nInjected: yes"}))
    await response.write(b"data: a\n\n")
    await response.end(b"data: [DONE]\n\n")


@pytest.fixture
async def server():
    srv = HTTPServer(max_body_bytes=1000, receive_timeout_s=1.0, keepalive_timeout_s=2.0)
    srv.route("POST", "/echo", echo)
    srv.route("GET", "/echo", echo)
    srv.route("POST", "/refuse", refuse)
    srv.route("GET", "/crash", crash)
    srv.streamer = Streamer()
    srv.route("POST", "/stream", srv.streamer)
    srv.route("POST", "/stream-end", stream_ending_with_data)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop(grace_s=1.0)


async def exchange(port: int, data: bytes, *, until_close: bool = True, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(-1), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes, *, extra: str = "", version: str = "1.1") -> bytes:
    return f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(server):
    requests = post("/echo?a=1", b"x" * 10, extra="x-slo-class: batch\r\n") + post("/echo", b"yy")
    requests += b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = await exchange(server.port, requests)
    replies = raw.split(b"HTTP/1.1 ")[1:]
    assert len(replies) == 3
    bodies = [json.loads(r.partition(b"\r\n\r\n")[2]) for r in replies]
    assert [b["size"] for b in bodies] == [10, 2, 0]
    assert bodies[0]["query"] == "a=1" and bodies[0]["class"] == "batch"  # header lookup is case-insensitive
    assert bodies[2]["method"] == "GET"
    assert b"Connection: close" in replies[2]


async def test_routing_errors_are_openai_errors(server):
    status, _, body = split(await exchange(server.port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, headers, body = split(await exchange(server.port, post("/refuse", b"", extra="Connection: close\r\n")))
    assert status == 429 and headers["retry-after"] == "2"
    assert json.loads(body)["error"]["message"] == "slow down"
    raw = await exchange(server.port, b"DELETE /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = split(raw)
    assert status == 405 and headers["allow"] == "POST, GET"
    status, _, body = split(await exchange(server.port, b"GET /crash HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 500 and json.loads(body)["error"]["message"] == "Internal proxy error."


async def test_head_gets_the_get_reply_without_its_body(server):
    raw = await exchange(server.port, b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = split(raw)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""


async def test_declared_oversize_body_is_refused_before_reading_it(server):
    # With Expect: 100-continue the client waits; the 413 comes instead of "100 Continue".
    raw = await exchange(
        server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _, body = split(raw)
    assert status == 413 and "larger than 1000 bytes" in json.loads(body)["error"]["message"]


async def test_expect_continue_gets_100_then_the_reply(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"abcd")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_chunked_body_over_the_limit_is_refused(server):
    chunk = b"x" * 600
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    status, _, _ = split(await exchange(server.port, data))
    assert status == 413


async def test_chunked_body_within_the_limit_is_joined(server):
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    data += b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    status, _, body = split(await exchange(server.port, data))
    assert status == 200 and json.loads(body)["size"] == 7


async def test_huge_head_malformed_and_slow_requests_get_bounded_errors(server):
    status, _, _ = split(await exchange(server.port, b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 70_000))
    assert status == 431
    status, _, body = split(await exchange(server.port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and "Malformed" in json.loads(body)["error"]["message"]
    # A request that starts but never finishes: 408 after the receive timeout (1 s here), not a hang.
    status, _, _ = split(await exchange(server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"))
    assert status == 408


async def test_idle_keep_alive_connection_is_closed(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/echo", b""))
    await asyncio.wait_for(reader.readuntil(b"}"), 5)
    assert await asyncio.wait_for(reader.read(-1), 6) == b""  # closed after ~2 s idle
    writer.close()


async def test_stream_head_leaves_with_the_first_chunk_and_is_chunked(server):
    raw = await exchange(server.port, post("/stream", b"", extra="Connection: close\r\n"))
    status, headers, body = split(raw)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "text/event-stream"
    assert body == b"9\r\ndata: 0\n\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"


async def test_a_stream_ended_with_data_frames_it_as_its_last_chunk(server):
    status, headers, body = split(await exchange(server.port, post("/stream-end", b"", extra="Connection: close\r\n")))
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers["x-extra"] == "1Injected: yes" and "injected" not in headers  # CR/LF dropped, not a new line
    assert body == b"9\r\ndata: a\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    status, headers, body = split(await exchange(server.port, post("/stream-end", b"", version="1.0")))
    assert status == 200 and "transfer-encoding" not in headers
    assert body == b"data: a\n\ndata: [DONE]\n\n"


async def test_http10_stream_is_close_delimited(server):
    status, headers, body = split(await exchange(server.port, post("/stream", b"", version="1.0")))
    assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_client_disconnect_cancels_the_handler(server):
    server.streamer.chunks = 1000
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/stream", b""))
    await asyncio.wait_for(reader.readuntil(b"data: 0"), 5)
    writer.close()
    await asyncio.wait_for(server.streamer.cancelled.wait(), 2)
    assert server.streamer.written < 1000


async def test_writes_wait_for_a_slow_reader(server):
    """Flow control: a client that does not read fills its socket, and the handler waits (bounded memory)."""
    server.streamer.chunks = 10**9
    payload = b"x" * 65536

    async def big_chunks(request: Request, response: Response) -> None:
        response.start(200, "application/octet-stream")
        while True:
            await response.write(payload)
            server.streamer.written += 1

    server.route("POST", "/big", big_chunks)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/big", b""))
    await asyncio.sleep(0.5)
    stalled_at = server.streamer.written
    await asyncio.sleep(0.3)
    assert server.streamer.written == stalled_at  # paused: nothing more is buffered while nobody reads
    assert stalled_at * len(payload) < 64 * 1024 * 1024
    for _ in range(400):  # reading drains the buffers and resumes the writer
        await reader.read(1 << 20)
        if server.streamer.written > stalled_at:
            break
    assert server.streamer.written > stalled_at
    writer.close()


async def test_stop_lets_a_request_in_progress_finish(server):
    server.streamer.chunks = 20  # ~0.2 s
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/stream", b""))
    await asyncio.wait_for(reader.readuntil(b"data: 0"), 5)
    stopping = asyncio.create_task(server.stop(grace_s=5.0))
    rest = await asyncio.wait_for(reader.read(-1), 5)
    await stopping
    assert rest.endswith(b"0\r\n\r\n") and b"data: 19" in rest
    writer.close()
