"""Hostile input against a real proxy replica: each gets a bounded-time OpenAI-format 4xx and bounded memory.

One proxy (a child process) in front of an emulated vLLM, spoken to over raw sockets so nothing
smooths the bytes over. Time bounds are generous (a loaded 2-core machine); the refusals measured
take about a millisecond.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from sloproxy.processes import EmulatorProcess, ProxyProcess

MSG = b'"model":"m","messages":[{"role":"user","content":'
RECEIVE_TIMEOUT_S = 1.5
KEEPALIVE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with EmulatorProcess([{"name": "v", "engine": "vllm", "model": "m", "max_model_len": 4096}], speedup=20.0) as fleet:
        config = {
            "backends": [{"name": "v", "engine": "vllm", "url": fleet.url("v"), "models": ["m"]}],
            "limits": {"receive_timeout_s": RECEIVE_TIMEOUT_S, "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S},
        }
        with ProxyProcess(config) as running:
            yield running


def port(proxy: ProxyProcess) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n" % (path.encode(), len(body))
    return head + extra + b"\r\n" + body


async def exchange(proxy: ProxyProcess, data: bytes, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``data``, read until the proxy closes: (status, headers, body, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    started = time.monotonic()
    writer.write(data)
    try:
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    seconds = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, seconds


def error(body: bytes) -> dict:
    parsed = json.loads(body)["error"]
    assert set(parsed) == {"message", "type", "param", "code"}
    return parsed


def rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    with open(f"/proc/{proxy.process.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


CHAT = "/v1/chat/completions"
CASES = {
    # name: (request bytes, status, error type, param)
    "nested 100k deep": (post(CHAT, b"{" + MSG + b"[" * 100_000 + b"]" * 100_000 + b"}]}"), 400, None),
    "nested 900 deep, unknown field": (
        post(CHAT, b"{" + MSG + b'"x"}],"meta":' + b"[" * 900 + b"]" * 900 + b"}"),
        400,
        None,
    ),
    "nested 65 deep": (post(CHAT, b"{" + MSG + b'"x"}],"meta":' + b"[" * 64 + b"]" * 64 + b"}"), 400, None),
    "n huge": (post(CHAT, b"{" + MSG + b'"x"}],"n":1000000}'), 400, "n"),
    "max_tokens huge": (post(CHAT, b"{" + MSG + b'"x"}],"max_tokens":10000000000000000000000}'), 400, "max_tokens"),
    "max_completion_tokens huge": (
        post(CHAT, b"{" + MSG + b'"x"}],"max_completion_tokens":131073}'),
        400,
        "max_completion_tokens",
    ),
    "prompt of 4M characters": (
        post("/v1/completions", b'{"model":"m","prompt":"' + b"word " * 800_000 + b'"}'),
        400,
        "prompt",
    ),
    "chat prompt of 4M characters": (post(CHAT, b"{" + MSG + b'"' + b"a" * 4_000_000 + b'"}]}'), 400, "messages"),
    "invalid UTF-8 in content": (post(CHAT, b"{" + MSG + b'"\xff\xfe"}]}'), 400, None),
    "invalid UTF-8 in an unknown key": (post(CHAT, b'{"\xff":1,' + MSG + b'"x"}]}'), 400, None),
    "lone surrogate escape": (post(CHAT, b"{" + MSG + b'"\\ud800"}]}'), 400, None),
    "CR in x-request-id": (post(CHAT, b"{}", b"X-Request-Id: a\rb\r\n"), 400, None),
    "LF in x-slo-class": (post(CHAT, b"{}", b"X-SLO-Class: a\nSet-Cookie: x=1\r\n"), 400, None),
    "NUL in a header": (post(CHAT, b"{}", b"X-Tenant: a\x00b\r\n"), 400, None),
    "obsolete line folding": (post(CHAT, b"{}", b"X-SLO-Class: a\r\n Set-Cookie: x=1\r\n"), 400, None),
    "Content-Length with chunked": (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        None,
    ),
    "chunk size overflow": (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffff\r\n",
        400,
        None,
    ),
    "12,000 headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 12_000 + b"\r\n", 431, None),
    "101 headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"x-a: b\r\n" * 100 + b"\r\n", 431, None),
    "head over 64 KiB": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, None),
    "declared body over the limit": (post(CHAT, b"", b"Content-Length: 5000000\r\n")[:-0] or b"", 413, None),
    "chunked body over the limit": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 70
        + b"0\r\n\r\n",
        413,
        None,
    ),
}
CASES["declared body over the limit"] = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n",
    413,
    None,
)


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_input_gets_a_quick_openai_error(proxy, name):
    data, expected, param = CASES[name]
    status, headers, body, seconds = await exchange(proxy, data)
    assert status == expected, body[:300]
    parsed = error(body)
    assert parsed["type"] == "invalid_request_error"
    assert parsed["param"] == param
    assert seconds < 2.0, f"{name} took {seconds:.2f} s"
    assert "set-cookie" not in headers


async def test_limits_name_the_limit(proxy):
    _, _, body, _ = await exchange(proxy, CASES["nested 65 deep"][0])
    assert "more than 64 levels" in error(body)["message"]
    _, _, body, _ = await exchange(proxy, CASES["n huge"][0])
    assert error(body)["message"] == "`n` must be at most 16, got 1000000."
    _, _, body, _ = await exchange(proxy, CASES["prompt of 4M characters"][0])
    assert error(body)["message"] == "The prompt has 4000000 characters; the limit is 1000000."
    _, _, body, _ = await exchange(proxy, CASES["101 headers"][0])
    assert "more than 100 header lines" in error(body)["message"]


async def test_within_the_limits_still_served(proxy):
    nested = b'"meta":' + b"[" * 63 + b"]" * 63  # 64 levels with the body's own object
    status, _, body, _ = await exchange(proxy, post(CHAT, b"{" + MSG + b'"hi"}],"max_tokens":2,' + nested + b"}"))
    assert status == 200 and json.loads(body)["choices"], body[:300]
    status, _, body, _ = await exchange(proxy, post(CHAT, b"{" + MSG + b'"hi"}],"max_tokens":131072,"n":16}'))
    assert error(body)["message"] == "The emulator serves n=1 only."  # the proxy let it through to the engine
    headers = b"".join(b"x-h%d: v\r\n" % i for i in range(96))  # with Host, Connection, Content-Length: 99
    status, _, _, _ = await exchange(proxy, post(CHAT, b"{" + MSG + b'"hi"}],"max_tokens":1}', headers))
    assert status == 200


async def test_unknown_slo_class_is_refused_without_echoing_it_in_headers(proxy):
    status, headers, body, _ = await exchange(
        proxy, post(CHAT, b"{" + MSG + b'"x"}]}', b"X-SLO-Class: evil\xe2\x82\xac\r\n")
    )
    assert status == 400 and error(body)["param"] == "x-slo-class"
    assert not any("evil" in value for value in headers.values())


async def test_a_prompt_just_under_the_limit_costs_no_more_than_the_engine_call(proxy):
    """999,000 characters pass the proxy's checks; the engine refuses the context: a 400 in bounded time."""
    body = b'{"model":"m","max_tokens":2,"prompt":"' + b"word " * 199_800 + b'"}'
    status, _, raw, seconds = await exchange(proxy, post("/v1/completions", body))
    assert status == 400 and "context" in raw.decode().lower()
    assert seconds < 5.0


async def dribble(proxy: ProxyProcess, first: bytes, slow: bytes, pause: float = 0.05) -> tuple[bytes, float]:
    """Send ``first`` at once, then ``slow`` one byte per ``pause`` until the proxy answers: (answer, seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    reading = asyncio.create_task(reader.read(-1))
    writer.write(first)
    started = time.monotonic()
    try:
        for byte in slow:
            if reading.done() or time.monotonic() - started > 15:
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reading, 15), time.monotonic() - started
    finally:
        writer.close()


async def test_slowloris_head_and_body_get_408(proxy):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 200 + b"\r\n"
    raw, seconds = await dribble(proxy, b"", head)  # one byte every 50 ms: the head alone needs ~12 s
    assert raw.startswith(b"HTTP/1.1 408") and b"timeout_error" in raw
    assert seconds < RECEIVE_TIMEOUT_S + 3.0
    body = b'{"model":"m","prompt":"' + b"x" * 400 + b'"}'
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    raw, seconds = await dribble(proxy, start, body)  # the head at once, the body one byte every 50 ms
    assert raw.startswith(b"HTTP/1.1 408") and b"timeout_error" in raw
    assert seconds < RECEIVE_TIMEOUT_S + 3.0


async def test_bytes_that_start_no_request_do_not_keep_a_connection_open(proxy):
    """Empty lines before a request line are skipped by the parser; they must not reset the idle clock."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port(proxy))
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < KEEPALIVE_TIMEOUT_S + 4:
        try:
            writer.write(b"\r\n")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        try:
            if await asyncio.wait_for(reader.read(1024), 0.3) == b"":
                closed = True
                break
        except TimeoutError:
            pass
    writer.close()
    assert closed and time.monotonic() - started < KEEPALIVE_TIMEOUT_S + 3.5


async def test_memory_stays_bounded_after_many_huge_bodies(proxy):
    huge_prompt = CASES["chat prompt of 4M characters"][0]
    oversize = CASES["chunked body over the limit"][0]
    for _ in range(3):  # warm up: allocator arenas, first-use caches
        await exchange(proxy, huge_prompt)
    before = rss_kib(proxy)
    for _ in range(25):
        status, _, _, _ = await exchange(proxy, huge_prompt)
        assert status == 400
        status, _, _, _ = await exchange(proxy, oversize)
        assert status == 413
    await asyncio.sleep(0.5)
    grown = rss_kib(proxy) - before
    assert grown < 48 * 1024, f"RSS grew by {grown} KiB after 50 bodies of ~4 MiB"
