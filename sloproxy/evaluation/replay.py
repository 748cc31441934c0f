"""Open-loop trace replay through the OpenAI API: each request is sent at its own arrival time.

Arrivals never wait for earlier replies (a closed loop would hide overload). At speedup K a
request due at ``arrival_s`` trace seconds is sent ``arrival_s / K`` wall seconds after the start,
and every measured wall duration is multiplied by K, so records are in trace seconds, matching
emulated engines that run K times faster. Latencies are timed from the actual send; how late the
sends were against the schedule (and how late this process's own event loop ran) is recorded in
the run's ``meta.extra`` so a replay that could not keep up is visible instead of silently wrong.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp
import msgspec
import numpy as np

from ..loop_lag import LoopLagMonitor
from ..sse import SSEDecoder
from .records import RequestRecord, RunMeta, default_slo_classes, tpot
from .workload import WorkloadRequest, client_body

SHED_STATUSES = frozenset({429, 503})  # the proxy's answer when it sheds load
ERROR_BODY_LIMIT = 64 * 1024


def chat_url(target: str) -> str:
    """``http://host:port`` (or ``…/v1``, or the full route) -> the chat completions URL."""
    base = target.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def select(
    requests: Sequence[WorkloadRequest], *, limit: int | None = None, max_duration_s: float | None = None
) -> list[WorkloadRequest]:
    """The requests a replay sends: arrivals up to ``max_duration_s`` (trace seconds), then the first ``limit``."""
    chosen = sorted(requests, key=lambda r: r.arrival_s)
    if max_duration_s is not None:
        chosen = [r for r in chosen if r.arrival_s <= max_duration_s]
    if limit is not None:
        chosen = chosen[:limit]
    return chosen


class Progress:
    """A one-line progress bar on a terminal stream, redrawn at most every 0.2 s."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.enabled, self.stream = total, enabled, stream
        self.counts: Counter[str] = Counter()
        self.sent = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def sending(self) -> None:
        self.sent += 1
        self._maybe_draw()

    def update(self, status: str) -> None:
        self.counts[status] += 1
        self._maybe_draw()

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= 0.2 or self.counts.total() == self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        done = self.counts.total()
        filled = int(30 * done / max(self.total, 1))
        c = self.counts
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} sent {self.sent} ok {c['ok']} "
            f"rejected {c['rejected']} error {c['error']} timeout {c['timeout']} | {now - self.started:.1f}s\x1b[K"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _stream_error_status(error: Any) -> int | None:
    """The status an in-stream error event stands for: its ``code`` (vLLM, SGLang) or, for TGI's events
    (``http_status_code`` 422 whatever happened), 429 when the message says it is overloaded."""
    if not isinstance(error, dict):
        return None
    if error.get("message") == "Model is overloaded":
        return 429
    code = error.get("code", error.get("http_status_code"))
    return code if isinstance(code, int) else None


def _error_message(body: bytes) -> str:
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:300].decode("utf-8", "replace")
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(parsed)[:300]


async def send_one(
    session: aiohttp.ClientSession, url: str, request: WorkloadRequest, *, speedup: float, timeout_s: float
) -> RequestRecord:
    """Stream one request and measure it; never raises (failures become the record's status)."""
    headers = {"x-slo-class": request.slo_class, "content-type": "application/json"}
    if request.tenant is not None:
        headers["x-tenant"] = request.tenant
    state: dict[str, Any] = {"first": None, "chunks": 0, "usage": None, "done": False, "error": None}
    http_status: int | None = None
    status = "ok"
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s / speedup):
            async with session.post(url, data=client_body(request), headers=headers) as response:
                http_status = response.status
                if response.status != 200:
                    raw = await response.content.read(ERROR_BODY_LIMIT)
                    status = "rejected" if response.status in SHED_STATUSES else "error"
                    state["error"] = _error_message(raw)
                else:
                    await _read_stream(response, state)
                    shed = state.get("error_status") in SHED_STATUSES and state["first"] is None
                    if shed:  # refused for load inside a stream before any content (TGI 3, SGLang 0.5)
                        status, http_status = "rejected", state["error_status"]
                    elif state["error"] is not None:
                        status = "error"
                    elif not state["done"]:
                        status, state["error"] = "error", "the stream ended before [DONE]"
    except TimeoutError:
        status, state["error"] = "timeout", f"no complete reply within {timeout_s:g} s (trace time)"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        status, state["error"] = "error", f"{type(exc).__name__}: {exc}"[:300]
    end = time.perf_counter()
    usage = state["usage"] or {}
    output_tokens = usage.get("completion_tokens")
    if not isinstance(output_tokens, int):
        output_tokens = state["chunks"] if status == "ok" or state["chunks"] else None
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
    ttft = (state["first"] - start) * speedup if state["first"] is not None else None
    e2e = (end - start) * speedup if status == "ok" else None
    if status == "ok" and ttft is None:
        ttft = e2e  # an empty reply: the client's first (and only) answer is the end of the stream
    return RequestRecord(
        id=request.id,
        model=request.model,
        slo_class=request.slo_class,
        arrival_s=request.arrival_s,
        status=status,
        http_status=http_status,
        error=state["error"],
        ttft_s=ttft,
        tpot_s=tpot(e2e, ttft, output_tokens) if status == "ok" else None,
        e2e_s=e2e,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        expected_output_tokens=request.output_tokens,
    )


async def _read_stream(response: aiohttp.ClientResponse, state: dict[str, Any]) -> None:
    """Consume SSE events into ``state``: first content time, content chunks, usage, [DONE], error frame."""
    decoder = SSEDecoder()
    async for chunk in response.content.iter_any():
        for payload in decoder.feed(chunk):
            if payload.strip() == b"[DONE]":
                state["done"] = True
                continue
            try:
                event = msgspec.json.decode(payload)
            except msgspec.DecodeError:
                state["error"] = f"unreadable stream event {payload[:80]!r}"
                return
            if not isinstance(event, dict):
                continue
            if "error" in event:
                state["error"] = _error_message(payload)
                state["error_status"] = _stream_error_status(event["error"])
                return
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if state["first"] is None:
                        state["first"] = time.perf_counter()
                    state["chunks"] += 1
            if event.get("usage"):
                state["usage"] = event["usage"]


def _lag_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)), "max": float(array.max())}


async def replay(
    requests: Sequence[WorkloadRequest],
    target: str,
    *,
    speedup: float = 1.0,
    timeout_s: float = 600.0,
    limit: int | None = None,
    label: str = "replay",
    progress: bool = False,
    max_duration_s: float | None = None,
    stats: dict[str, Any] | None = None,
) -> list[RequestRecord]:
    """Send ``requests`` open loop to ``target``; one record per request sent, in workload order.

    ``target`` may list several base URLs, comma-separated (proxy replicas behind no balancer):
    requests alternate between them in workload order.

    ``stats``, when given, receives the replayer's own health: ``send_lag_s`` (actual send minus
    schedule, wall seconds) and ``loop_lag_ms`` (event-loop timer lateness) percentiles.
    ``label`` only names the run in the progress line.
    """
    if speedup <= 0:
        raise ValueError("--speedup must be positive")
    if timeout_s <= 0:
        raise ValueError("--timeout must be positive")
    chosen = select(requests, limit=limit, max_duration_s=max_duration_s)
    urls = [chat_url(t.strip()) for t in target.split(",") if t.strip()]
    if not urls:
        raise ValueError("--target needs a base URL")
    bar = Progress(len(chosen), progress)
    if progress:
        sys.stderr.write(f"{label}: {len(chosen)} requests to {', '.join(urls)} at speedup {speedup:g}\n")
    monitor = LoopLagMonitor()
    monitor.start()
    loop = asyncio.get_running_loop()
    send_lags: list[float] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def fire(request: WorkloadRequest, due: float, url: str) -> RequestRecord:
                send_lags.append(max(loop.time() - due, 0.0))
                bar.sending()
                record = await send_one(session, url, request, speedup=speedup, timeout_s=timeout_s)
                bar.update(record.status)
                return record

            tasks: list[asyncio.Task[RequestRecord]] = []
            start = loop.time() + 0.05
            for index, request in enumerate(chosen):
                due = start + request.arrival_s / speedup
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fire(request, due, urls[index % len(urls)])))
            records = list(await asyncio.gather(*tasks))
    finally:
        await monitor.stop()
        bar.close()
    if stats is not None:
        stats["send_lag_s"] = _lag_summary(send_lags)
        stats["loop_lag_ms"] = monitor.summary()
    return records


async def replay_run(
    requests: Sequence[WorkloadRequest],
    target: str,
    *,
    workload: str,
    label: str,
    speedup: float = 1.0,
    timeout_s: float = 600.0,
    limit: int | None = None,
    max_duration_s: float | None = None,
    progress: bool = False,
    slo_classes: dict[str, dict[str, Any]] | None = None,
) -> tuple[RunMeta, list[RequestRecord]]:
    """:func:`replay` plus the run's meta line (what ``sloproxy replay`` writes)."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    stats: dict[str, Any] = {}
    records = await replay(
        requests,
        target,
        speedup=speedup,
        timeout_s=timeout_s,
        limit=limit,
        label=label,
        progress=progress,
        max_duration_s=max_duration_s,
        stats=stats,
    )
    meta = RunMeta(
        label=label,
        source="replay",
        workload=workload,
        target=target,
        speedup=speedup,
        duration_s=max((r.arrival_s for r in records), default=0.0),
        slo_classes=slo_classes or default_slo_classes(),
        started_at=started_at,
        extra={**stats, "timeout_s": timeout_s, "workload_requests": len(requests)},
    )
    return meta, records
