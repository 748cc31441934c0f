"""OpenTelemetry traces: one server span per request, children for scheduling, queueing and each upstream call.

Cost model. With tracing off the proxy holds ``None`` instead of a :class:`Tracing` and the request path
does one ``is not None`` check per hook: no span objects, no context attach. With tracing on, only two
spans are created while the request is live, right before the upstream write (the server span and the
upstream CLIENT span whose id goes to the engine in ``traceparent``); everything else — the schedule and
queue spans, every attribute — is written after the reply has left, from timestamps the request already
records (monotonic floats), converted to epoch nanoseconds with one offset taken per request.

Span tree of one request::

    POST /v1/chat/completions   SERVER  gen_ai.* + sloproxy.* (class, tenant, prediction, SLO met, ...)
    ├── sloproxy.schedule       INTERNAL  prediction + classification: the inputs of the policy's decision
    ├── sloproxy.queue          INTERNAL  per attempt: admission, waiting, dispatch (backend) or rejection
    └── chat <model>            CLIENT    per attempt: the engine call (retries and evictions are siblings)

Configuration: the ``tracing:`` section, each unset field falling back to the standard ``OTEL_*``
variables (see :func:`Tracing.from_config`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__
from .adapters.base import UpstreamCall
from .backends import Backend
from .config import TracingConfig
from .errors import ProxyError
from .request import Kind, ProxyRequest
from .slo_outcome import rejected_in_queue, rejection_reason, was_rejected

log = logging.getLogger("sloproxy.tracing")

OPERATION = {"chat": "chat", "completions": "text_completion"}  # gen_ai.operation.name
ROUTE = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class TracingSetupError(ValueError):
    """Tracing was asked for in a way the proxy cannot honour (unknown exporter or protocol)."""


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _exporters(config: TracingConfig) -> list[str]:
    if config.exporter is not None:
        names = [config.exporter]
    else:
        if (_env("OTEL_SDK_DISABLED") or "").lower() == "true":
            return []
        names = [n.strip().lower() for n in (_env("OTEL_TRACES_EXPORTER") or "none").split(",") if n.strip()]
    unknown = set(names) - {"otlp", "console", "none"}
    if unknown:
        raise TracingSetupError(f"unsupported trace exporter(s) {sorted(unknown)}: use otlp, console or none")
    return [] if "none" in names else names


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    protocol = config.protocol or _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"  # the specification's default
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        return GRPCExporter(endpoint=config.endpoint)  # None: the OTEL_EXPORTER_OTLP_* variables decide
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        endpoint = config.endpoint.rstrip("/") + "/v1/traces" if config.endpoint else None
        return HTTPExporter(endpoint=endpoint)
    raise TracingSetupError(f"unsupported OTLP protocol {protocol!r}: use http/protobuf or grpc")


def _resource(config: TracingConfig) -> Resource:
    attributes: dict[str, Any] = {"service.version": __version__}
    if config.service_name:
        attributes["service.name"] = config.service_name
    elif not _env("OTEL_SERVICE_NAME") and "service.name=" not in (_env("OTEL_RESOURCE_ATTRIBUTES") or ""):
        attributes["service.name"] = "sloproxy"
    return Resource.create(attributes)  # merges OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES


class Tracing:
    """The proxy's tracer and what it needs per request; exists only while tracing is on."""

    def __init__(self, provider: TracerProvider, policy: str = "", exporters: list[SpanExporter] | None = None) -> None:
        self.provider = provider
        self.exporters = exporters or []  # what from_config built (for logs and tests)
        self.tracer = provider.get_tracer("sloproxy", __version__)
        self.policy = policy

    @classmethod
    def from_config(cls, config: TracingConfig, policy: str = "") -> Tracing | None:
        """None when no exporter is configured (the default): the request path then skips all tracing.

        The SDK itself reads ``OTEL_TRACES_SAMPLER(_ARG)``, ``OTEL_BSP_*`` and the OTLP exporter variables.
        """
        names = _exporters(config)
        if not names:
            return None
        exporters = [_otlp_exporter(config) if name == "otlp" else ConsoleSpanExporter() for name in names]
        log.info("tracing on: exporters %s", ", ".join(names))
        tracing = cls.with_processors([BatchSpanProcessor(e) for e in exporters], config, policy)
        tracing.exporters = exporters
        return tracing

    @classmethod
    def with_processors(
        cls, processors: list[SpanProcessor], config: TracingConfig | None = None, policy: str = ""
    ) -> Tracing:
        """A tracer exporting through ``processors`` (tests pass a SimpleSpanProcessor over an in-memory exporter)."""
        config = config or TracingConfig()
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio)) if config.sample_ratio is not None else None
        provider = TracerProvider(resource=_resource(config), sampler=sampler)  # sampler None: OTEL_TRACES_SAMPLER
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider, policy)

    def begin(self, headers: Mapping[str, str], kind: Kind, started: float) -> RequestTrace:
        return RequestTrace(self, headers, kind, started)

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporters (blocking: run it off the event loop)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. Created at arrival (no OTel work), spans started only when needed."""

    __slots__ = ("_attempt", "_kind", "_offset_ns", "_scheduled", "_server", "_started", "headers", "tracing")

    def __init__(self, tracing: Tracing, headers: Mapping[str, str], kind: Kind, started: float) -> None:
        self.tracing = tracing
        self.headers = headers
        self._kind = kind
        self._started = started
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        self._server: trace_api.Span | None = None
        self._attempt: trace_api.Span | None = None
        self._scheduled = False

    def _ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._offset_ns

    def _server_span(self) -> trace_api.Span:
        if self._server is None:
            parent = propagate.extract(self.headers)  # the client's traceparent / tracestate, if any
            self._server = self.tracing.tracer.start_span(
                f"POST {ROUTE[self._kind]}", context=parent, kind=SpanKind.SERVER, start_time=self._ns(self._started)
            )
        return self._server

    def _child(self, name: str, start: float, kind: SpanKind = SpanKind.INTERNAL) -> trace_api.Span:
        context = trace_api.set_span_in_context(self._server_span())
        return self.tracing.tracer.start_span(name, context=context, kind=kind, start_time=self._ns(start))

    # ----- live hooks (forward.py) ------------------------------------------------------------------
    def upstream_started(self, request: ProxyRequest, backend: Backend, call: UpstreamCall) -> None:
        """Before the engine call: start its CLIENT span and put its context in the call's headers."""
        server = self._server_span()
        if not server.is_recording():  # sampled out: pass the (unsampled) context on, build nothing else
            call.headers = dict(call.headers)
            propagate.inject(call.headers, context=trace_api.set_span_in_context(server))
            return
        self._queue_span(request, backend)
        span = self._attempt = self._child(
            f"{OPERATION[request.kind]} {request.model}", time.monotonic(), SpanKind.CLIENT
        )
        call.headers = dict(call.headers)  # adapters may share one headers dict between calls
        propagate.inject(call.headers, context=trace_api.set_span_in_context(span))

    def upstream_ended(
        self, request: ProxyRequest, backend: Backend, status: int | None, error: BaseException | None
    ) -> None:
        """The attempt is over (reply relayed, failed, evicted or abandoned)."""
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION[request.kind],
            "gen_ai.request.model": request.model,
            "gen_ai.provider.name": backend.adapter.engine,
            "server.address": backend.url,
            "sloproxy.backend": backend.name,
            "sloproxy.attempt": request.attempts,
            "sloproxy.retry": request.attempts > 1,
            "sloproxy.evicted": request.evicted,
        }
        if status is not None:
            attributes["http.response.status_code"] = status
        span.set_attributes(attributes)
        if request.evicted:
            span.set_status(Status(StatusCode.ERROR, "evicted by the scheduler"))
        elif error is not None and not isinstance(error, GeneratorExit):
            span.set_attribute("error.type", _error_type(error))
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()

    def _queue_span(
        self, request: ProxyRequest, backend: Backend | None, error: ProxyError | None = None, ended: float = 0.0
    ) -> None:
        """This attempt's acquire, from the timestamps forward.py stamps around it (the first one is
        preceded by the schedule span: prediction and classification, arrival to acquire)."""
        queued = request.queued_at
        if queued is None:
            return
        if not self._scheduled:
            self._scheduled = True
            schedule = self._child("sloproxy.schedule", request.received_at)
            schedule.set_attributes(_decision_attributes(request, self.tracing.policy))
            schedule.end(self._ns(queued))
        end = request.dispatched_at if error is None and request.dispatched_at is not None else ended
        span = self._child("sloproxy.queue", queued)
        attributes: dict[str, Any] = {
            "sloproxy.attempt": request.attempts if error is None else request.attempts + 1,
            "sloproxy.queue.wait_s": end - queued,
            "sloproxy.policy": self.tracing.policy,
        }
        if backend is not None:
            attributes["sloproxy.backend"] = backend.name
        span.set_attributes(attributes)
        if error is not None:
            span.set_attribute("sloproxy.rejection.reason", rejection_reason(error))
            span.set_status(Status(StatusCode.ERROR, error.message[:200]))
        span.end(self._ns(end))

    # ----- the end (app.py) -------------------------------------------------------------------------
    def finish(
        self,
        request: ProxyRequest | None,
        outcome: str,
        error: BaseException | None,
        met: bool | None,
        ended: float,
    ) -> None:
        """Write the request's attributes and end its spans (after the reply has gone)."""
        if not self._server_span().is_recording():  # sampled out: no attributes to compute
            return
        rejected = isinstance(error, ProxyError) and was_rejected(request)
        if rejected and request is not None and rejected_in_queue(request):  # its queue span says why
            self._queue_span(request, None, error, ended)  # type: ignore[arg-type]
        span = self._server_span()
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "http.route": ROUTE[self._kind],
            "url.path": ROUTE[self._kind],
            "gen_ai.operation.name": OPERATION[self._kind],
            "sloproxy.outcome": outcome,
            "sloproxy.policy": self.tracing.policy,
        }
        status = 200 if outcome == "ok" else getattr(error, "status", None)
        if status is not None:
            attributes["http.response.status_code"] = status
        if request is not None:
            attributes.update(_decision_attributes(request, self.tracing.policy))
            attributes["gen_ai.request.model"] = request.model
            attributes["sloproxy.request_id"] = request.id
            attributes["sloproxy.stream"] = request.stream
            attributes["sloproxy.attempts"] = request.attempts
            attributes["sloproxy.retries"] = max(0, request.attempts - 1 - request.evictions)
            attributes["sloproxy.evictions"] = request.evictions
            attributes["sloproxy.queue.wait_s"] = request.queue_wait_s
            if request.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = request.max_tokens
            if request.temperature is not None:
                attributes["gen_ai.request.temperature"] = request.temperature
            if request.prompt_tokens is not None:
                attributes["gen_ai.usage.input_tokens"] = request.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = request.completion_tokens or 0
            if request.backend is not None:
                attributes["sloproxy.backend"] = request.backend
            if request.first_token_at is not None:
                attributes["sloproxy.ttft_s"] = request.first_token_at - request.received_at
            if met is not None:
                attributes["sloproxy.slo.met"] = met
        if isinstance(error, ProxyError):
            attributes["error.type"] = rejection_reason(error)
            if rejected:
                attributes["sloproxy.rejection.reason"] = rejection_reason(error)
        elif error is not None:
            attributes["error.type"] = _error_type(error)
        span.set_attributes(attributes)
        if outcome not in ("ok", "client_disconnected") and (status is None or status >= 500):
            span.set_status(Status(StatusCode.ERROR, str(error)[:200] if error else outcome))
        span.end(self._ns(ended))


def _decision_attributes(request: ProxyRequest, policy: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "sloproxy.policy": policy,
        "sloproxy.tenant": request.tenant,
        "sloproxy.band": request.band,
        "sloproxy.estimated_output_tokens": request.est_output_tokens,
        "sloproxy.estimate_source": request.estimate_source,
    }
    if request.slo is not None:
        attributes["sloproxy.slo_class"] = request.slo.name
    if request.pred_p50 is not None:
        attributes["sloproxy.predicted_output_tokens.p50"] = request.pred_p50
        attributes["sloproxy.predicted_output_tokens.p90"] = request.pred_p90 or request.pred_p50
    if request.deadline is not None:
        attributes["sloproxy.deadline_s"] = request.deadline - request.received_at
    return attributes


def _error_type(error: BaseException) -> str:
    if isinstance(error, ProxyError):
        return rejection_reason(error)
    return type(error).__qualname__
