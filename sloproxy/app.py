"""The proxy's HTTP surface: OpenAI routes plus health, readiness, metrics (served by http_server.py on uvloop)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from . import openapi
from .backends import BackendPool
from .config import ProxyConfig
from .errors import ProxyError
from .estimates import LengthEstimates
from .forward import Forwarder
from .http_server import HTTPServer, Request, Response
from .outlier import OutlierDetector
from .plugins import load_policy
from .proxy_metrics import ProxyMetrics
from .request import Kind, parse_request
from .scheduler import Scheduler
from .slo import Classifier
from .state import SharedState
from .tracing import Tracing

if TYPE_CHECKING:
    from .state.redis_state import RedisCoordinator

log = logging.getLogger("sloproxy")


class Proxy:
    """Everything one proxy replica runs: backend pool, forwarder, metrics."""

    def __init__(self, config: ProxyConfig, tracing: Tracing | None = None) -> None:
        self.config = config
        # None unless an exporter is configured (tracing: or OTEL_TRACES_EXPORTER): the request path
        # then does nothing for traces but an `is not None` check.
        self.tracing = tracing if tracing is not None else Tracing.from_config(config.tracing)
        if self.tracing is not None:
            self.tracing.policy = config.policy.name
        self.pool = BackendPool(config.backends, config.health, config.load_polling)
        self.metrics = ProxyMetrics(self.pool)
        self.policy = load_policy(config.policy.name, config.policy.params)
        self.coordinator: RedisCoordinator | None = None
        state = None
        if config.state.backend == "redis":  # several replicas: admission by shares (state/redis_state.py)
            from .state.redis_state import RedisCoordinator

            self.coordinator = RedisCoordinator(config.state, [b.name for b in self.pool.backends])
            state = SharedState(self.coordinator)
        self.scheduler = Scheduler(self.policy, self.pool, config.scheduling, state=state)
        self.metrics.attach(self.scheduler)
        if self.coordinator is not None:
            self.metrics.attach_state(self.coordinator)
        self.classifier = Classifier(config.slo_classes, config.default_class, config.tenants, config.models)
        # Circuit breaking: backends whose requests keep failing are ejected for a while (outlier.py).
        self.outlier = OutlierDetector(config.outlier, self.pool) if config.outlier.enabled else None
        if self.outlier is not None:
            self.metrics.attach_outlier(self.outlier)
        self.forwarder = Forwarder(self.pool, self.scheduler, config.limits, self.metrics, self.outlier)
        self.estimates = LengthEstimates.from_config(config.predictor, self.policy.uses_predictions)
        self.metrics.attach_predictor(self.estimates)
        if self.coordinator is not None and self.estimates.learner is not None:  # one model for the fleet
            self.estimates.learner.exchange = self.coordinator
            self.estimates.learner.replica = self.coordinator.replica_id
        if self.estimates.enabled:
            self.scheduler.predict_many = self.estimates.predict_many  # run off the first-chunk path, batched

    async def start(self) -> None:
        await self.pool.start()
        if self.coordinator is not None:
            await self.coordinator.start()  # Redis down: degraded, not an error (the log says so)
            self.scheduler.shares_changed()
        self.scheduler.start()
        self.estimates.start()
        if not self.pool.ready:
            log.warning("no backend is healthy at start; /ready reports 503 until one is")

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.estimates.stop()
        await self.forwarder.stop()
        if self.outlier is not None:
            self.outlier.stop()
        if self.coordinator is not None:
            await self.coordinator.stop()  # after the last request: its capacity returns to the fleet now
        await self.pool.stop()
        if self.tracing is not None:  # flushes buffered spans: blocking, so off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    # ----- routes -------------------------------------------------------------------------------
    async def chat(self, request: Request, response: Response) -> None:
        await self._openai(request, response, "chat")

    async def completions(self, request: Request, response: Response) -> None:
        await self._openai(request, response, "completions")

    async def _openai(self, http: Request, response: Response, kind: Kind) -> None:
        started = time.monotonic()
        trace = self.tracing.begin(http.headers, kind, started) if self.tracing is not None else None
        metrics = self.metrics
        metrics.in_flight += 1
        proxy_request = None
        outcome = "error"
        error: BaseException | None = None
        try:
            proxy_request = parse_request(kind, http.body, http.headers.get("x-request-id"), self.config.limits)
            proxy_request.received_at = started
            proxy_request.trace = trace
            if self.estimates.enabled:
                self.estimates.prior(proxy_request)  # before classify: deadlines depend on the estimate
            proxy_request.classify(*self.classifier.classify(http.headers, proxy_request.model))
            await self.forwarder.forward(response, proxy_request)
            if proxy_request.disconnected:
                outcome = "client_disconnected"
                metrics.disconnects.labels(proxy_request.model).inc()
            else:
                outcome = "ok"
                self.estimates.finished(proxy_request)
        except ProxyError as exc:
            outcome, error = f"http_{exc.status}", exc
            raise
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            outcome, error = "client_disconnected", exc
            if proxy_request is not None:
                metrics.disconnects.labels(proxy_request.model).inc()
            raise
        except Exception as exc:
            error = exc
            raise
        finally:
            metrics.in_flight -= 1
            ended = time.monotonic()
            met = metrics.finished(proxy_request, outcome, error, ended)
            if trace is not None:
                trace.finish(proxy_request, outcome, error, met, ended)
            error = None  # this frame <-> the traceback: a cycle would keep the body alive until a GC pass

    async def models(self, request: Request, response: Response) -> None:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "sloproxy"} for model in self.pool.models()]
        response.send(200, msgspec.json.encode({"object": "list", "data": data}))

    async def health(self, request: Request, response: Response) -> None:
        response.send(200, b'{"status":"ok"}')

    async def ready(self, request: Request, response: Response) -> None:
        healthy = [b.name for b in self.pool.backends if b.healthy]
        body = msgspec.json.encode({"ready": bool(healthy), "healthy_backends": healthy})
        response.send(200 if healthy else 503, body)

    async def prometheus(self, request: Request, response: Response) -> None:
        response.send(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")


def build_server(proxy: Proxy) -> HTTPServer:
    """The proxy's routes on the lean HTTP server (see http_server.py for why not aiohttp's)."""
    server = HTTPServer.from_limits(proxy.config.limits)
    server.route("POST", "/v1/chat/completions", proxy.chat)
    server.route("POST", "/v1/completions", proxy.completions)
    server.route("GET", "/v1/models", proxy.models)
    server.route("GET", "/health", proxy.health)
    server.route("GET", "/ready", proxy.ready)
    server.route("GET", "/metrics", proxy.prometheus)
    server.route("GET", "/openapi.json", openapi.route(proxy.config.limits))
    return server
