"""Traces: the span tree and attributes of a streamed, a rejected and a retried request (in-memory exporter),
W3C trace context in from the client and out to the engine, exporter selection from OTEL_* variables, and an
OTLP/HTTP export that reaches a local receiver intact.

The proxy runs in the test's event loop (so its spans can be read back); engines are emulated in a child
process, except a stub that always answers 503 and records the headers it was sent.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sloproxy.app import Proxy, build_server
from sloproxy.config import TracingConfig, parse_config
from sloproxy.processes import EmulatorProcess
from sloproxy.tracing import Tracing, TracingSetupError
from tests.helpers import sse_events

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
STREAM_BODY = {"model": "m", "messages": [{"role": "user", "content": "Tell me about queues."}], "stream": True}


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    with EmulatorProcess([{"name": "good", "engine": "vllm", "model": "m"}], speedup=20.0) as running:
        yield running


@asynccontextmanager
async def proxy_in_loop(config: dict[str, Any], tracing: Tracing | None) -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy(
        parse_config({"predictor": {"mode": "off"}, "policy": {"name": "round-robin"}, **config}), tracing=tracing
    )
    server = build_server(proxy)
    await proxy.start()
    await server.start("127.0.0.1", 0)
    try:
        yield proxy, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop(1.0)
        await proxy.stop()


@asynccontextmanager
async def failing_engine(received: list[dict[str, str]]) -> AsyncIterator[str]:
    """A backend that is healthy but answers every completion with 503 (and records its headers)."""

    async def completions(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.json_response({"object": "error", "message": "overloaded", "code": 503}, status=503)

    app = web.Application()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", health)
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.with_processors([SimpleSpanProcessor(exporter)]), exporter


def backend(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "url": url, "models": ["m"]}


def tree(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one server span and its children (asserting every span is its child, in one trace)."""
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in spans]
    server = servers[0]
    children = sorted((s for s in spans if s is not server), key=lambda s: s.start_time or 0)
    for child in children:
        assert child.parent is not None and child.parent.span_id == server.context.span_id, child.name
        assert child.context.trace_id == server.context.trace_id
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time, child.name
    return server, children


async def test_streamed_request_span_tree_and_attributes(fleet):
    tracing, exporter = in_memory()
    async with (
        proxy_in_loop({"backends": [backend("good", fleet.url("good"))]}, tracing) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        headers = {"traceparent": TRACEPARENT, "x-tenant": "acme", "x-slo-class": "interactive"}
        async with session.post(url + "/v1/chat/completions", json=STREAM_BODY, headers=headers) as response:
            assert response.status == 200
            assert sse_events(await response.read())[-1] == b"[DONE]"
    server, children = tree(exporter.get_finished_spans())
    assert [(s.name, s.kind) for s in children] == [
        ("sloproxy.schedule", SpanKind.INTERNAL),
        ("sloproxy.queue", SpanKind.INTERNAL),
        ("chat m", SpanKind.CLIENT),
    ]
    # The client's trace context is the server span's parent.
    assert format(server.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN_ID
    attributes = server.attributes
    assert server.name == "POST /v1/chat/completions"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["http.response.status_code"] == 200
    assert attributes["sloproxy.slo_class"] == "interactive"
    assert attributes["sloproxy.tenant"] == "acme"
    assert attributes["sloproxy.policy"] == "round-robin"
    assert attributes["sloproxy.backend"] == "good"
    assert attributes["sloproxy.outcome"] == "ok"
    assert attributes["sloproxy.attempts"] == 1 and attributes["sloproxy.retries"] == 0
    assert attributes["sloproxy.evictions"] == 0
    assert attributes["sloproxy.slo.met"] is True  # 20x emulation is far inside 1.5 s TTFT / 100 ms TPOT
    assert 0 < attributes["sloproxy.ttft_s"] < 1.5
    assert attributes["sloproxy.queue.wait_s"] >= 0
    schedule, queue, upstream = children
    assert schedule.attributes["sloproxy.slo_class"] == "interactive"
    assert schedule.attributes["sloproxy.deadline_s"] > 0
    assert queue.attributes["sloproxy.backend"] == "good" and queue.attributes["sloproxy.attempt"] == 1
    assert upstream.attributes["gen_ai.provider.name"] == "vllm"
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.attributes["sloproxy.retry"] is False
    assert upstream.status.status_code != StatusCode.ERROR


async def test_rejected_request_has_a_failed_queue_span(fleet):
    tracing, exporter = in_memory()
    config = {
        "backends": [backend("good", fleet.url("good"))],
        "policy": {"name": "fcfs"},
        # The only backend's budget is 0 (and may not grow): the request must wait, and nothing may wait.
        "scheduling": {"max_queue": 0, "budget_initial": 0, "budget_min": 0, "budget_max": 0},
    }
    async with (
        proxy_in_loop(config, tracing) as (_, url),
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=STREAM_BODY) as response,
    ):
        assert response.status == 429
    server, children = tree(exporter.get_finished_spans())
    assert [s.name for s in children] == ["sloproxy.schedule", "sloproxy.queue"]  # no engine call
    queue = children[1]
    assert queue.status.status_code == StatusCode.ERROR
    assert queue.attributes["sloproxy.rejection.reason"] == "queue_full"
    assert queue.attributes["sloproxy.attempt"] == 1
    assert server.attributes["http.response.status_code"] == 429
    assert server.attributes["sloproxy.rejection.reason"] == "queue_full"
    assert server.attributes["error.type"] == "queue_full"
    assert server.attributes["sloproxy.slo.met"] is False
    assert server.attributes["sloproxy.policy"] == "fcfs"
    assert server.attributes["sloproxy.attempts"] == 0


async def test_retried_request_and_traceparent_to_the_engine(fleet):
    tracing, exporter = in_memory()
    received: list[dict[str, str]] = []
    async with failing_engine(received) as flaky_url:
        config = {"backends": [backend("flaky", flaky_url), backend("good", fleet.url("good"))]}
        async with proxy_in_loop(config, tracing) as (_, url), aiohttp.ClientSession() as session:
            for _ in range(2):  # round-robin: one of two starts on the flaky backend
                async with session.post(url + "/v1/chat/completions", json=STREAM_BODY) as response:
                    assert response.status == 200
                    await response.read()
    traces: dict[int, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        traces.setdefault(span.context.trace_id, []).append(span)
    assert len(traces) == 2
    retried = [spans for spans in traces.values() if sum(s.kind == SpanKind.CLIENT for s in spans) == 2]
    assert retried  # whichever backend round-robin starts with, a request started on the flaky one
    server, children = tree(tuple(retried[0]))
    assert [s.name for s in children] == [
        "sloproxy.schedule",
        "sloproxy.queue",
        "chat m",
        "sloproxy.queue",
        "chat m",
    ]
    first, second = children[2], children[4]
    assert first.attributes["sloproxy.backend"] == "flaky"
    assert first.attributes["http.response.status_code"] == 503
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["sloproxy.backend"] == "good" and second.attributes["sloproxy.retry"] is True
    assert [children[1].attributes["sloproxy.attempt"], children[3].attributes["sloproxy.attempt"]] == [1, 2]
    assert server.attributes["sloproxy.attempts"] == 2 and server.attributes["sloproxy.retries"] == 1
    assert server.attributes["sloproxy.backend"] == "good"
    # The engine was sent the failed attempt's span as its parent.
    assert len(received) == len(retried)
    sent = [r["traceparent"] for r in received if int(r["traceparent"].split("-")[1], 16) == server.context.trace_id]
    assert len(sent) == 1
    version, trace_id, parent_id, flags = sent[0].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == server.context.trace_id
    assert int(parent_id, 16) == first.context.span_id


def test_tracing_is_off_unless_asked(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert Tracing.from_config(TracingConfig()) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert Tracing.from_config(TracingConfig()) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing = Tracing.from_config(TracingConfig())
    assert tracing is not None and [type(e) for e in tracing.exporters] == [ConsoleSpanExporter]
    assert Tracing.from_config(TracingConfig(exporter="none")) is None  # the config file wins
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Tracing.from_config(TracingConfig()) is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(TracingSetupError):
        Tracing.from_config(TracingConfig())


def test_otel_variables_choose_protocol_endpoint_service_and_sampler(monkeypatch):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-proxy")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    tracing = Tracing.from_config(TracingConfig())
    assert tracing is not None
    (exporter,) = tracing.exporters
    assert isinstance(exporter, HTTPExporter) and exporter._endpoint == "http://collector:4318/v1/traces"
    assert tracing.provider.resource.attributes["service.name"] == "edge-proxy"
    assert "0.25" in tracing.provider.sampler.get_description()
    tracing.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    tracing = Tracing.from_config(TracingConfig())
    assert tracing is not None and isinstance(tracing.exporters[0], GRPCExporter)
    tracing.shutdown()
    # Config fields win over the variables.
    config = TracingConfig(exporter="otlp", protocol="http/protobuf", endpoint="http://other:4318/", service_name="s")
    tracing = Tracing.from_config(config)
    assert tracing is not None and tracing.exporters[0]._endpoint == "http://other:4318/v1/traces"
    assert tracing.provider.resource.attributes["service.name"] == "s"
    tracing.shutdown()


async def test_otlp_http_export_arrives_intact(fleet, monkeypatch):
    bodies: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        raw = await request.read()
        bodies.append(gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # Configured the way an operator would: only OTEL_* variables, no tracing section.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sloproxy-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    try:
        async with (
            proxy_in_loop({"backends": [backend("good", fleet.url("good"))]}, None) as (proxy, url),
            aiohttp.ClientSession() as session,
        ):
            assert proxy.tracing is not None
            body = {**STREAM_BODY, "stream": False}
            async with session.post(url + "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}) as r:
                assert r.status == 200
                usage = json.loads(await r.read())["usage"]
        # proxy.stop() flushed the batch processor into the receiver
    finally:
        await runner.cleanup()
    assert bodies
    spans = []
    service_names = set()
    for raw in bodies:
        export = ExportTraceServiceRequest.FromString(raw)
        for resource_spans in export.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service_names.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "sloproxy"
                spans.extend(scope_spans.spans)
    assert service_names == {"sloproxy-test"}
    assert sorted(s.name for s in spans) == [
        "POST /v1/chat/completions",
        "chat m",
        "sloproxy.queue",
        "sloproxy.schedule",
    ]
    assert {s.trace_id.hex() for s in spans} == {CLIENT_TRACE_ID}
    server = next(s for s in spans if s.name.startswith("POST"))
    assert server.parent_span_id.hex() == CLIENT_SPAN_ID
    assert all(s.parent_span_id == server.span_id for s in spans if s is not server)
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["gen_ai.request.model"].string_value == "m"
    assert attributes["gen_ai.usage.input_tokens"].int_value == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"].int_value == usage["completion_tokens"]
    assert attributes["sloproxy.slo.met"].bool_value is True
    assert attributes["sloproxy.stream"].bool_value is False
    assert server.end_time_unix_nano > server.start_time_unix_nano > 0


async def test_sampled_out_request_exports_nothing_but_passes_its_context_on(fleet):
    """A request the sampler drops costs no spans or attributes, yet the engine still gets the trace
    context (with the sampled flag off), so its own tracing agrees with the proxy's decision."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_processors([SimpleSpanProcessor(exporter)], TracingConfig(sample_ratio=0.0))
    received: list[dict[str, str]] = []
    unsampled = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00"
    async with failing_engine(received) as flaky_url:
        config = {"backends": [backend("flaky", flaky_url), backend("good", fleet.url("good"))]}
        async with proxy_in_loop(config, tracing) as (_, url), aiohttp.ClientSession() as session:
            for _ in range(2):
                headers = {"traceparent": unsampled}
                async with session.post(url + "/v1/chat/completions", json=STREAM_BODY, headers=headers) as response:
                    assert response.status == 200
                    await response.read()
    assert exporter.get_finished_spans() == ()
    assert received and all(r["traceparent"].split("-")[1] == CLIENT_TRACE_ID for r in received)
    assert all(r["traceparent"].endswith("-00") for r in received)
