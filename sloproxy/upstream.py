"""A lean HTTP/1.1 client for proxy-to-engine calls: keep-alive pools over asyncio protocols.

The proxy makes one upstream call per client request, so the client's per-request cost is
most of the proxy's own overhead. This one writes the request bytes directly, parses replies
with ``httptools`` (llhttp, the parser Node.js uses), hands body chunks over as they arrive
(streamed tokens are forwarded without buffering) and applies TCP back-pressure when the
consumer is slower than the engine.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the engine pauses


class UpstreamError(Exception):
    """Connecting, sending or reading failed (the engine is unreachable or went away)."""


class UpstreamTimeout(UpstreamError):
    pass


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()  # once per connection: each lookup costs a getpid() syscall
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.reading_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid HTTP from upstream: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if exc is None and response is not None and response.status and not response._delimited:
            response._on_complete()  # a body without length ends when the server closes the connection
            return
        self._fail(UpstreamError("connection closed by upstream" if exc is None else f"connection lost: {exc!r}"))

    # -- httptools callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name, value))
            if name.lower() in (b"content-length", b"transfer-encoding"):
                self.response._delimited = True

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            response.status = self.parser.get_status_code()
            response._keep_alive = self.parser.should_keep_alive()
            response._wake_headers()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._on_body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None:
            response._on_complete()

    # -- helpers -----------------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._on_error(error)

    def pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class UpstreamResponse:
    """Status and headers once awaited; then the body, whole or chunk by chunk."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_delimited",
        "_error",
        "_keep_alive",
        "_released",
        "_timer",
        "_wait_body",
        "_wait_started",
        "_waiter",
        "headers",
        "status",
        "timeout",
    )

    def __init__(self, conn: _Connection, timeout: float, wait_body: bool = False) -> None:
        self._conn = conn
        self._wait_body = wait_body  # the caller resumes at the first body bytes, not at the head
        self.timeout = timeout  # seconds of silence that fail it (settable: first byte, then streaming pace)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._keep_alive = False
        self._delimited = False  # Content-Length or chunked: the body's end is known without a close
        self._released = False
        self._waiter: asyncio.Future | None = None
        # One silence timer per response, not one per wait (a stream waits once per read): it
        # fails the pending wait once it has lasted ``timeout``, else it re-arms for what is left.
        self._timer: asyncio.TimerHandle | None = None
        self._wait_started = 0.0

    # -- producer side (protocol callbacks) ----------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_headers(self) -> None:
        if not self._wait_body:
            self._wake()

    def _on_body(self, body: bytes) -> None:  # once per HTTP chunk: a streamed event each, so kept lean
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_complete(self) -> None:
        self._complete = True
        self._stop_timer()
        self._wake()

    def _on_error(self, error: UpstreamError) -> None:
        if not self._complete:
            self._error = error
        self._stop_timer()
        self._wake()

    # -- consumer side -----------------------------------------------------------------------
    async def _wait(self) -> None:
        loop = self._conn.loop
        self._waiter = waiter = loop.create_future()
        self._wait_started = now = loop.time()
        timer = self._timer
        if timer is None or timer.when() > now + self.timeout:  # none yet, or armed for a longer timeout
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_later(self.timeout, self._check_silence)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_silence(self) -> None:
        loop = self._conn.loop
        waiter, now = self._waiter, loop.time()
        left = self.timeout
        if waiter is not None and not waiter.done():
            left = self._wait_started + self.timeout - now
            if left <= 0:
                self._timer = None
                waiter.set_exception(UpstreamTimeout(f"no data from upstream for {self.timeout:g}s"))
                return
        self._timer = loop.call_later(left, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _headers(self) -> None:
        while not self.status or (self._wait_body and not self._chunks and not self._complete):
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (joined), waiting until some do; ``b""``
        once the body is complete. A method rather than an async generator: a stream the caller
        stops reading early would leave a generator for the loop's finaliser hook to close (a
        thread-safe wake-up and a task per stream)."""
        while True:
            chunks = self._chunks
            if chunks:
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                chunks.clear()
                self._buffered = 0
                self._conn.resume()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)  # one part (a whole reply in one read) comes back as it is, not copied

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if it can be reused."""
        if self._released:
            return
        self._released = True
        self._stop_timer()
        conn = self._conn
        conn.response = None
        if self._complete and self._keep_alive and not conn.closed and self._error is None:
            conn.pool._put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response and drop the connection (the engine sees the client leave).

        Anyone still reading it gets an :class:`UpstreamError` at once.
        """
        if not self._released:
            self._released = True
            self._stop_timer()
            self._conn.response = None
            self._conn.close()
            if not self._complete:
                self._error = UpstreamError("closed by the proxy")
                self._wake()


class UpstreamPool:
    """Keep-alive connections to one ``http://host:port``."""

    def __init__(
        self, base_url: str, *, connect_timeout: float = 2.0, read_timeout: float = 300.0, max_idle: int = 512
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"upstream URLs must be http:// or https://, got {base_url!r}")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()

    def _put_back(self, conn: _Connection) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.ssl),
                self.connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        return conn

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        on_sent: Callable[[UpstreamResponse], None] | None = None,
        wait_body: bool = False,
    ) -> UpstreamResponse:
        """Send one request and wait for its status and headers (``wait_body``: and the first body
        bytes or the end, so a stream's caller resumes once for its head and first event, not twice).

        ``on_sent`` gets the response as soon as the request is written, so the caller can
        abandon it (``close()``) even before the engine answers.
        """
        head = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode(), self._host_header]
        if headers:
            head.extend(f"{name}: {value}\r\n".encode() for name, value in headers.items())
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        payload = b"".join(head) + body
        read_timeout = timeout or self.read_timeout
        while self._idle:  # a reused connection the engine closed meanwhile fails before any byte: try the next
            conn = self._idle.pop()
            if conn.closed:
                continue
            response = self._send(conn, payload, read_timeout, wait_body)
            if on_sent is not None:
                on_sent(response)
            try:
                await response._headers()
                return response
            except UpstreamTimeout:
                response.close()
                raise
            except UpstreamError:
                if response._released or response.status:  # closed by the caller, or the engine had answered
                    raise
                response.close()
                continue
            except BaseException:  # cancelled (client gone): drop the connection so the engine aborts
                response.close()
                raise
        response = self._send(await self._connect(), payload, read_timeout, wait_body)
        if on_sent is not None:
            on_sent(response)
        try:
            await response._headers()
        except BaseException:
            response.close()
            raise
        return response

    def _send(self, conn: _Connection, payload: bytes, timeout: float, wait_body: bool) -> UpstreamResponse:
        response = UpstreamResponse(conn, timeout, wait_body)
        conn.response = response  # a pooled connection's parser ended its last reply cleanly: it reads the next
        assert conn.transport is not None
        conn.transport.write(payload)
        return response

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
