"""Forwarding: pick a backend, call it, relay the reply or stream, retry, abort, map errors.

Retries happen only before the client has received a byte: a connection failure, a
retryable status (429, 5xx), a reply the adapter cannot read, a stream that dies before its first
event or sends nothing for ``first_byte_timeout_s`` moves the request to another backend serving
the model (once by default). After bytes were sent, a failure becomes an OpenAI error frame
followed by ``[DONE]``. A client that goes away closes the upstream connection at once (and SGLang
gets an explicit ``/abort_request``). Every attempt's outcome goes to the outlier detector
(outlier.py), which ejects backends that keep failing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from .adapters.base import EngineAdapter, StreamTranslator, UpstreamCall
from .backends import Backend, BackendPool
from .config import Limits
from .context import CLAMP_HEADER
from .errors import ProxyError, error_frame
from .http_server import JSON, HeaderLines, Response
from .outlier import OutlierDetector
from .proxy_metrics import ProxyMetrics
from .request import ProxyRequest
from .scheduler import Scheduler
from .sse import SSEDecoder
from .upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("sloproxy.forward")
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
ADMISSION_STATUSES = frozenset({429, 503})  # the engine is full, not broken: no mark against it
SSE_HEADERS = HeaderLines.of({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # rendered once


class _RetryableFailure(Exception):
    """The attempt failed before the client saw a byte; another backend may serve it."""

    def __init__(self, error: ProxyError, backend_failed: bool | None = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.backend_failed = backend_failed  # for the breaker: False = the backend's fault, None = not


def _clamp_header(request: ProxyRequest) -> dict[str, str] | None:
    """The reply header that says the proxy cut the client's reply limit to fit the backend's window."""
    return None if request.clamped_to is None else {CLAMP_HEADER: str(request.clamped_to)}


class _ClientGone(Exception):
    """The client closed its connection mid-stream; the partly sent response is all it gets."""


def _translate(translator: StreamTranslator, payload: bytes) -> bytes:
    """One upstream event through the adapter; a malformed event ends the stream with an error frame."""
    try:
        return translator.feed(payload)
    except Exception as exc:  # the engine sent something the adapter cannot read
        log.warning("untranslatable stream event: %r", exc)
        return translator.error(502, "The backend sent a stream event the proxy could not read.")


def _relay_events(translator: StreamTranslator, decoder: SSEDecoder, events: bytes) -> bytes:
    """Client bytes for a read of whole events: runs of events the translator passes as they are
    are forwarded without splitting them; each other event is split and translated on its own."""
    pos = translator.unchanged_until(events)
    if pos == len(events):
        return events
    parts = [events[:pos]] if pos else []
    while pos < len(events):
        end = events.find(b"\n\n", pos) + 2
        parts += [_translate(translator, payload) for payload in decoder.feed(events[pos:end])]
        pos = translator.unchanged_until(events, end)
        if pos > end:
            parts.append(events[end:pos])
    return b"".join(parts)


async def _client_write(response: Response, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError:
        raise _ClientGone from None


async def _client_end(response: Response, data: bytes = b"") -> None:
    try:
        await response.end(data)
    except ConnectionResetError:
        raise _ClientGone from None


class Forwarder:
    def __init__(
        self,
        pool: BackendPool,
        scheduler: Scheduler,
        limits: Limits,
        metrics: ProxyMetrics,
        outlier: OutlierDetector | None = None,
    ) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.limits = limits
        self.metrics = metrics
        self.outlier = outlier
        self._upstreams: dict[str, UpstreamPool] = {
            backend.name: UpstreamPool(
                backend.url, connect_timeout=limits.connect_timeout_s, read_timeout=limits.read_timeout_s
            )
            for backend in pool.backends
        }
        self._background: set[asyncio.Task] = set()

    async def stop(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for upstream in self._upstreams.values():
            upstream.close()

    async def forward(self, response: Response, request: ProxyRequest) -> None:
        """Answer ``request`` through ``response`` from a backend the scheduler hands out."""
        last_error: ProxyError | None = None
        failures = 0
        while failures <= self.limits.retries_before_first_byte:
            if last_error is not None and not self.scheduler.candidates(request):
                break
            request.queued_at = time.monotonic()
            backend = await self.scheduler.acquire(request)
            request.dispatched_at = time.monotonic()
            request.queue_wait_s += request.dispatched_at - request.queued_at
            request.backend = backend.name
            request.attempts += 1
            served: bool | None = None  # the attempt's verdict on the backend (outlier.py)
            reason = ""
            try:
                served = await self._attempt(response, request, backend)
                if served is False:
                    reason = "its stream failed after the client had the first bytes"
                    request.failed_mid_stream = True
                return
            except _RetryableFailure as failure:
                if request.evicted:  # the scheduler moved it: back to the queue, not a failure
                    request.evicted = False
                    request.evictions += 1
                    continue
                served, reason = failure.backend_failed, failure.error.message
                failures += 1
                last_error = failure.error
                request.excluded.add(backend.name)
                self.metrics.retries.labels(backend.name).inc()
                log.info(
                    "request %s failed on %s before its first byte: %s", request.id, backend.name, failure.error.message
                )
            except ProxyError as error:  # the engine refused the request itself (4xx), or an odd 5xx
                served = None if error.status < 500 else False
                reason = error.message
                if not request.first_byte_sent and self.pool.reroute_after_refusal(request, backend, error):
                    continue  # to a backend whose window holds it: not the backend's failure, nor a retry
                raise
            finally:
                if self.outlier is not None:
                    self.outlier.record(backend, id(request), served, reason)
                request.evict = None
                self.scheduler.release(request, backend, request.tokens_used)
        raise last_error or ProxyError(503, f"No backend could serve model `{request.model}`.")

    async def _attempt(self, response: Response, request: ProxyRequest, backend: Backend) -> bool | None:
        """One try on ``backend``. Returns whether the backend served it (None: the client left
        first); raises :class:`_RetryableFailure` while another backend may still serve it."""
        adapter = backend.adapter
        request.clamped_to = request.clamps.get(backend.name) if request.clamps is not None else None
        call = adapter.build(request)
        upstream: UpstreamResponse | None = None
        finished = False
        trace = request.trace
        if trace is not None:
            trace.upstream_started(request, backend, call)

        def movable(response: UpstreamResponse) -> None:
            request.evict = response.close  # the scheduler may move it while nothing reached the client
            if not request.stream:  # the reply is being generated; a stream waits for its first chunk
                self.scheduler.under_way(request, backend)

        # A stream must show its first event within first_byte_timeout_s; a non-streamed reply's
        # headers come only when it is complete, so it is bounded by read_timeout_s alone.
        timeout = self.limits.first_byte_timeout_s if request.stream else None
        served: bool | None = True
        try:
            try:
                upstream = await self._upstreams[backend.name].request(
                    "POST", call.path, call.body, call.headers, timeout, on_sent=movable, wait_body=request.stream
                )
            except UpstreamError as exc:
                if request.evicted:  # closed by the scheduler before the engine answered
                    self._abort_in_engine(adapter, backend, request)
                    raise _RetryableFailure(ProxyError(503, "evicted"), None) from None
                if isinstance(exc, UpstreamTimeout):
                    error = ProxyError(504, f"Backend {backend.name} did not answer ({exc}).")
                    raise _RetryableFailure(error) from None
                raise _RetryableFailure(ProxyError(502, f"Backend {backend.name} is unreachable ({exc}).")) from None
            if upstream.status != 200:
                body = await self._read(upstream, backend)
                error = adapter.translate_error(upstream.status, body)
                finished = True
                if upstream.status in RETRYABLE_STATUSES:
                    raise _RetryableFailure(error, None if upstream.status in ADMISSION_STATUSES else False)
                raise error
            if request.stream:
                try:
                    served = await self._relay_stream(response, request, adapter, upstream, backend)
                except _ClientGone:
                    request.disconnected = True
                    return None
            else:
                body = await self._read(upstream, backend)
                finished = True  # read whole: the connection may serve again whatever the body says
                reply = self._translate_reply(adapter, request, body, backend)
                if adapter.reply_load_header is not None:
                    self.pool.reply_load(backend, upstream.headers)
                try:
                    response.send(200, reply, JSON, _clamp_header(request))
                except ConnectionResetError:
                    request.disconnected = True
                    served = None
            finished = True
            return served
        finally:
            if trace is not None:
                trace.upstream_ended(request, backend, upstream and upstream.status, sys.exc_info()[1])
            if upstream is not None:
                if finished:
                    upstream.release()
                else:  # client gone or failure mid-way: drop the connection so the engine aborts now
                    upstream.close()
                    self._abort_in_engine(adapter, backend, request)

    async def _read(self, upstream: UpstreamResponse, backend: Backend) -> bytes:
        try:
            return await upstream.read()
        except UpstreamError as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            raise _RetryableFailure(ProxyError(status, f"Backend {backend.name} failed mid-reply ({exc}).")) from None

    @staticmethod
    def _translate_reply(adapter: EngineAdapter, request: ProxyRequest, body: bytes, backend: Backend) -> bytes:
        """The client's body; a reply the adapter cannot read is the backend's failure, and since
        nothing reached the client yet, another backend may serve the request."""
        try:
            return adapter.translate_reply(request, body)
        except Exception as exc:  # garbage from the engine must never become the proxy's own 500
            log.warning("unreadable reply from %s: %r", backend.name, exc)
            error = ProxyError(502, f"Backend {backend.name} sent a reply the proxy could not read.")
            raise _RetryableFailure(error) from None

    async def _relay_stream(
        self,
        response: Response,
        request: ProxyRequest,
        adapter: EngineAdapter,
        upstream: UpstreamResponse,
        backend: Backend,
    ) -> bool:
        """Relay the engine's stream; returns False if it failed after the client got bytes
        (the client then has an error frame), True if it ended properly."""
        decoder = SSEDecoder()
        translator: StreamTranslator = adapter.stream_translator(request)
        started = time.monotonic()
        try:
            while chunk := await upstream.next_chunk():
                if chunk.endswith(b"\n\n") and b"\r" not in chunk and not decoder.pending:  # whole events
                    out = _relay_events(translator, decoder, chunk)
                else:
                    out = b"".join([_translate(translator, payload) for payload in decoder.feed(chunk)])
                if out:
                    if not response.started:
                        failure = translator.failure
                        if failure is not None:  # an error before anything was sent: answer with its status
                            if failure.status in RETRYABLE_STATUSES or failure.status >= 500:
                                blame = None if failure.status in ADMISSION_STATUSES else False
                                raise _RetryableFailure(failure, blame)
                            raise failure
                        clamp = request.clamped_to
                        response.start(
                            200,
                            "text/event-stream",
                            SSE_HEADERS
                            if clamp is None
                            else HeaderLines(SSE_HEADERS + HeaderLines.of(_clamp_header(request))),
                        )
                        request.first_byte_sent = True
                        upstream.timeout = self.limits.read_timeout_s  # the first event came: streaming pace now
                        await _client_write(response, out)  # the head leaves with the first chunk
                        self.scheduler.first_token(request, backend)
                        self.metrics.first_byte(request.model, time.monotonic() - started)
                    elif translator.done:
                        await _client_end(response, out)  # the last events and the end in one write
                    else:
                        await _client_write(response, out)
                if translator.done:
                    break
        except UpstreamError as exc:
            status = 504 if isinstance(exc, UpstreamTimeout) else 502
            if not response.started:
                error = ProxyError(status, f"Backend {backend.name} failed mid-stream ({exc}).")
                raise _RetryableFailure(error) from None
            log.warning(
                "request %s: backend %s failed mid-stream after the first bytes: %s", request.id, backend.name, exc
            )
            await _client_write(response, error_frame(status, f"The backend failed mid-stream ({exc})."))
            await _client_end(response)
            return False
        ok = translator.done and not translator.failed
        if translator.failed and response.started and translator.failure is not None:
            log.warning(
                "request %s: backend %s reported an error mid-stream: %s",
                request.id,
                backend.name,
                translator.failure.message,
            )
        if not translator.done:
            if not response.started:
                raise _RetryableFailure(ProxyError(502, f"Backend {backend.name} closed the stream early."))
            log.warning("request %s: backend %s closed the stream before it finished", request.id, backend.name)
            await _client_write(response, error_frame(502, "The backend closed the stream before it finished."))
        if not response.started:  # a stream with nothing in it at all
            raise _RetryableFailure(ProxyError(502, f"Backend {backend.name} sent an empty stream."))
        await _client_end(response)
        return ok

    def _abort_in_engine(self, adapter: EngineAdapter, backend: Backend, request: ProxyRequest) -> None:
        call = adapter.abort_call(request)
        if call is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_abort(backend, call))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_abort(self, backend: Backend, call: UpstreamCall) -> None:
        try:
            response = await self._upstreams[backend.name].request("POST", call.path, call.body, call.headers, 2.0)
            try:
                await response.read()
            finally:
                response.release()
        except UpstreamError as exc:
            log.info("abort of %s on %s failed: %s", call.path, backend.name, exc)
