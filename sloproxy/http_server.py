"""A lean HTTP/1.1 server for the proxy's client side: an asyncio protocol parsing with httptools.

Why not aiohttp's server: in front of a backend that paces tokens 20 ms apart
(``bench/proxy_overhead.py``), aiohttp's request and response machinery alone added about
0.4 ms to the first streamed chunk (the CPU idles between tokens, so every request runs
cold), against about 0.15 ms for this protocol, which parses with httptools (llhttp) and
sends the response head in the same write as the first chunk. The proxy serves a handful of
routes, so the server stays small. What it does:

* keep-alive and pipelining (answered in order; reading pauses while requests pile up);
* request bodies by length or chunked, with a size limit (413 before reading a declared
  oversize body), ``Expect: 100-continue``, limits on the request head's size and on its
  number of header lines (431);
* a deadline for receiving a request once it started (408, against slow clients), an idle
  timeout for keep-alive connections (bytes that start no request do not count as activity)
  and a send timeout for clients that stop reading their reply, all checked by one sweeper
  task (no per-request timers);
* flow control: a handler's write waits while the client's socket buffer is full;
* response headers never carry control characters (no header injection from echoed values);
* a client that disconnects cancels its handler (the proxy then aborts the upstream call);
* every failure leaves as an OpenAI-format error; HTTP/1.0 clients get close-delimited streams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from .errors import ProxyError, error_body

if TYPE_CHECKING:
    from .config import Limits

log = logging.getLogger("sloproxy.http")

JSON = "application/json"
MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED = 8  # requests parsed ahead of the one being answered before reading pauses
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # CR, LF, NUL...: would end or split a header line


_dict_get, _dict_getitem, _dict_contains = dict.get, dict.__getitem__, dict.__contains__


class Headers(dict[str, str]):
    """Request headers: names stored lower-case, looked up case-insensitively (as HTTP's are)."""

    # dict's own methods called directly: these run several times per request, and super() costs
    # more than the lookup itself
    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return _dict_get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return _dict_getitem(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _dict_contains(self, name.lower())


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    keep_alive: bool
    http10: bool


Handler = Callable[[Request, "Response"], Awaitable[None]]


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def _header_line(name: str, value: str) -> bytes:
    """One header line, safe whatever the value holds: a value may echo client input, so control
    characters (CR, LF: header injection, response splitting) are dropped and non-Latin-1 replaced."""
    line = f"{name}: {value}"
    if _CONTROL.search(line) is not None:
        line = _CONTROL.sub("", line)
    return line.encode("latin-1", "replace") + b"\r\n"


_JSON_LINE = _header_line("Content-Type", JSON)


@functools.lru_cache(maxsize=64)
def _content_type_line(content_type: str) -> bytes:
    return _header_line("Content-Type", content_type)


class HeaderLines(bytes):
    """Header lines rendered once, for a reply that sends the same ones every time (every stream's
    head): ``HeaderLines.of({...})`` where a mapping would be rendered again per reply."""

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> HeaderLines:
        return cls(b"".join(_header_line(name, value) for name, value in headers.items()))


ReplyHeaders = Mapping[str, str] | HeaderLines | None


def _head(status: int, content_type: str | None, headers: ReplyHeaders, framing: bytes) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
    if content_type == JSON:
        parts.append(_JSON_LINE)
    elif content_type is not None:
        parts.append(_content_type_line(content_type))
    if isinstance(headers, HeaderLines):
        parts.append(headers)
    elif headers:
        parts.extend(_header_line(name, value) for name, value in headers.items())
    parts.append(framing)
    return b"".join(parts)


class Response:
    """What a handler answers through: ``send`` one whole reply, or ``start`` a stream, ``write``
    chunks and ``end`` it. The head of a stream leaves with its first chunk (one write, one packet)."""

    __slots__ = ("_conn", "_head_only", "_http10", "_pending_head", "finished", "started", "status")

    def __init__(self, conn: _Connection, *, head_only: bool = False, http10: bool = False) -> None:
        self._conn = conn
        self._head_only = head_only
        self._http10 = http10
        self._pending_head: bytes | None = None
        self.started = False
        self.finished = False
        self.status = 0

    def send(self, status: int, body: bytes, content_type: str | None = JSON, headers: ReplyHeaders = None) -> None:
        """The whole reply at once, with its length."""
        if self.started:
            raise RuntimeError("the response has already started")
        self.started = self.finished = True
        self.status = status
        framing = b"Content-Length: %d\r\n%s\r\n" % (len(body), self._conn.connection_header())
        head = _head(status, content_type, headers, framing)
        self._conn.write(head if self._head_only else head + body)

    def start(self, status: int, content_type: str, headers: ReplyHeaders = None) -> None:
        """Begin a streamed reply; nothing is sent until the first chunk (or the end)."""
        if self.started:
            raise RuntimeError("the response has already started")
        self.started = True
        self.status = status
        if self._http10:  # no chunked encoding for HTTP/1.0: the body ends when the connection closes
            self._conn.keep_alive = False
            framing = b"Connection: close\r\n\r\n"
        else:
            framing = b"Transfer-Encoding: chunked\r\n%s\r\n" % self._conn.connection_header()
        self._pending_head = _head(status, content_type, headers, framing)

    async def write(self, data: bytes) -> None:
        """Send one chunk; waits while the client reads slower than we write. Raises
        ``ConnectionResetError`` when the client is gone."""
        if not data or self._head_only:
            return
        frame = data if self._http10 else b"%x\r\n%s\r\n" % (len(data), data)
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            frame = head + frame
        await self._conn.write_and_drain(frame)

    async def end(self, data: bytes = b"") -> None:
        """Send ``data`` (if any) as the last chunk and end the reply, in one write."""
        if self.finished:
            return
        self.finished = True
        if self._head_only:
            tail = b""
        elif self._http10:
            tail = data
        else:
            tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            tail = head + tail
        if tail:
            await self._conn.write_and_drain(tail)


@dataclass(slots=True)
class _Rejection:
    """A request the server refuses before any handler sees it; the connection closes after."""

    status: int
    message: str


class _Connection(asyncio.Protocol):
    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        # Looked up once: C asyncio's get_running_loop() makes a getpid() syscall per call (its fork
        # check), and the request path would make several per request.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.keep_alive = True  # of the request being answered
        self.closed = False
        self.last_active = time.monotonic()  # connection made or last reply sent (idle timeout)
        self.receiving_since: float | None = None  # a request started arriving and is not complete
        self.stalled_since: float | None = None  # the client stopped reading: our writes are paused
        self._reading_head = True
        self._head_bytes = 0
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers = Headers()
        self._body: list[bytes] = []
        self._body_size = 0
        self._stop_parsing = False
        self._pending: collections.deque[Request | _Rejection] = collections.deque()
        self._task: asyncio.Task | None = None
        self._reading_paused = False
        self._drain: asyncio.Future | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._stop_parsing:
            return
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # e.g. h2c: answered as plain HTTP/1.1, the upgrade ignored
            self.parser = httptools.HttpRequestParser(self)
            offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
            if offset < len(data):
                self.data_received(data[offset:])
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"Malformed HTTP request: {exc}.")
            return
        if self._reading_head and self._head_bytes > MAX_HEAD_BYTES:
            self._reject(431, f"The request head is larger than {MAX_HEAD_BYTES} bytes.")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._body = []  # a body cut short by the client: freed now, not at the next GC pass
        self.server.connections.discard(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))
            self._drain.exception()  # retrieved here: no "never retrieved" warning if nobody waits
        if self._task is not None:
            self._task.cancel()  # the client is gone: its handler stops (and aborts upstream)

    def pause_writing(self) -> None:
        self.stalled_since = time.monotonic()
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        self.stalled_since = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.receiving_since = time.monotonic()
        self._url = b""
        self._raw_headers = []
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))  # kept minimal: it runs once per header line

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        if len(self._raw_headers) > self.server.max_headers:
            self._reject(431, f"The request has more than {self.server.max_headers} header lines.")
            return
        headers = Headers()
        size = len(self._url)
        for name, value in self._raw_headers:
            size += len(name) + len(value) + 4
            key = name.decode("latin-1").lower()
            previous = dict.get(headers, key)
            text = value.decode("latin-1")
            dict.__setitem__(headers, key, text if previous is None else f"{previous}, {text}")
        # A whole head can arrive in one read, where data_received's count cannot see it end: sized here.
        if size > MAX_HEAD_BYTES:
            self._reject(431, f"The request head is larger than {MAX_HEAD_BYTES} bytes.")
            return
        self._headers = headers
        limit = self.server.max_body_bytes
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._reject(413, f"The request body is larger than {limit} bytes.")
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._stop_parsing:
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            self._reject(413, f"The request body is larger than {self.server.max_body_bytes} bytes.")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._stop_parsing:
            return
        self._reading_head = True
        self.receiving_since = None
        url = self._url.decode("latin-1")
        path, _, query = url.partition("?")
        parser = self.parser
        request = Request(
            method=parser.get_method().decode("latin-1"),
            path=path,
            query=query,
            headers=self._headers,
            body=b"".join(self._body) if len(self._body) != 1 else self._body[0],
            keep_alive=parser.should_keep_alive(),
            http10=parser.get_http_version() == "1.0",
        )
        self._body = []
        self._enqueue(request)

    # -- answering ----------------------------------------------------------------------------
    def _reject(self, status: int, message: str) -> None:
        """Stop reading this connection; answer ``status`` after anything already queued, then close."""
        self._stop_parsing = True
        self.receiving_since = None
        self._body = []  # never used now; the parser <-> connection cycle would keep it until a GC pass
        self._enqueue(_Rejection(status, message))

    def _enqueue(self, item: Request | _Rejection) -> None:
        self._pending.append(item)
        if self._task is None:
            self._task = self._loop.create_task(self._answer_pending())
        elif len(self._pending) > MAX_PIPELINED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    async def _answer_pending(self) -> None:
        try:
            while self._pending and not self.closed:
                item = self._pending.popleft()
                if self._reading_paused and len(self._pending) < MAX_PIPELINED and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                if isinstance(item, _Rejection):
                    self.keep_alive = False
                    Response(self).send(item.status, error_body(item.status, item.message))
                    self._linger_close()
                    return
                self.keep_alive = item.keep_alive and not self.server.stopping
                response = Response(self, head_only=item.method == "HEAD", http10=item.http10)
                await self.server.answer(item, response)
                self.last_active = time.monotonic()
                if not self.keep_alive:
                    self.close()
                    return
        finally:
            self._task = None

    def connection_header(self) -> bytes:
        return b"" if self.keep_alive else b"Connection: close\r\n"

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(data)

    async def write_and_drain(self, data: bytes) -> None:
        self.write(data)
        if self._drain is not None:
            await self._drain

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered first

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data (``close`` would wait to flush it)."""
        if self.transport is not None:
            self.transport.abort()

    def _linger_close(self) -> None:
        """Close after a refusal without resetting: stop writing, let the client finish sending (what
        it sends is discarded) so it reads the error instead of a connection reset, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            self._loop.call_later(2.0, self.close)
        else:
            self.close()

    @property
    def idle(self) -> bool:
        return self._task is None and not self._pending and self.receiving_since is None


class HTTPServer:
    """Routes by exact path, then method; HEAD is answered by a GET route without its body."""

    def __init__(
        self,
        *,
        max_body_bytes: int,
        receive_timeout_s: float = 30.0,
        keepalive_timeout_s: float = 75.0,
        send_timeout_s: float = 60.0,
        max_headers: int = 100,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.receive_timeout_s = receive_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.send_timeout_s = send_timeout_s
        self.max_headers = max_headers
        self.routes: dict[str, dict[str, Handler]] = {}
        self.prefix_routes: dict[str, dict[str, Handler]] = {}  # "/v1/models/" -> handlers of paths under it
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None

    @classmethod
    def from_limits(cls, limits: Limits) -> HTTPServer:
        """A server enforcing the configured client-side limits (``limits:`` in the proxy config)."""
        return cls(
            max_body_bytes=limits.max_body_bytes,
            receive_timeout_s=limits.receive_timeout_s,
            keepalive_timeout_s=limits.keepalive_timeout_s,
            send_timeout_s=limits.send_timeout_s,
            max_headers=limits.max_headers,
        )

    def route(self, method: str, path: str, handler: Handler) -> None:
        """``path`` exactly; or, ending in ``/*``, any path under it (the handler reads the rest)."""
        if path.endswith("/*"):
            self.prefix_routes.setdefault(path[:-1], {})[method] = handler
        else:
            self.routes.setdefault(path, {})[method] = handler

    def _methods(self, path: str) -> dict[str, Handler] | None:
        methods = self.routes.get(path)
        if methods is None and self.prefix_routes:
            methods = next(
                (m for p, m in self.prefix_routes.items() if path.startswith(p) and len(path) > len(p)), None
            )
        return methods

    async def answer(self, request: Request, response: Response) -> None:
        """Run the route's handler; whatever it raises becomes an OpenAI-format error (or, once the
        reply started, the connection closes: the client sees a cut stream, never a hang)."""
        try:
            methods = self._methods(request.path)
            if methods is None:
                raise ProxyError(404, f"There is no route {request.method} {request.path}.")
            handler = methods.get(request.method)
            if handler is None and request.method == "HEAD":
                handler = methods.get("GET")
            if handler is None:
                raise ProxyError(
                    405,
                    f"Method {request.method} is not allowed on {request.path}.",
                    headers={"Allow": ", ".join(methods)},
                )
            await handler(request, response)
            if not response.finished:
                if not response.started:
                    raise RuntimeError(f"the handler of {request.path} returned without answering")
                await response.end()
        except ProxyError as error:
            self._fail(response, error.status, error.body(), error.headers)
        except ConnectionResetError:
            response._conn.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            self._fail(response, 500, error_body(500, "Internal proxy error."), None)

    @staticmethod
    def _fail(response: Response, status: int, body: bytes, headers: Mapping[str, str] | None) -> None:
        if response.started:
            response._conn.close()  # too late for a status: cut the reply
            return
        with contextlib.suppress(ConnectionResetError):
            response.send(status, body, JSON, headers)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str, port: int, *, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        self._sweeper = loop.create_task(self._sweep(), name="http-sweeper")

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace_s``), then close everything."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
            if conn._task is not None:
                conn._task.cancel()

    async def _sweep(self) -> None:
        """Once a second: time out requests that arrive too slowly, keep-alive connections left idle,
        and clients that stopped reading their reply (their handler is cancelled: upstream aborts)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                since = conn.receiving_since
                stalled = conn.stalled_since
                if since is not None and now - since > self.receive_timeout_s:
                    conn._reject(408, f"The request did not arrive within {self.receive_timeout_s:g} s.")
                elif stalled is not None and now - stalled > self.send_timeout_s:
                    conn.abort()
                elif conn.idle and now - conn.last_active > self.keepalive_timeout_s:
                    conn.close()
