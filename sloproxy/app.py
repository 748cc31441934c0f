"""The proxy's HTTP surface: OpenAI routes plus health, readiness, metrics (served by http_server.py on uvloop)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from .backends import BackendPool
from .config import ProxyConfig
from .errors import ProxyError
from .estimates import LengthEstimates
from .forward import Forwarder
from .http_server import HTTPServer, Request, Response
from .plugins import load_policy
from .proxy_metrics import ProxyMetrics
from .request import Kind, parse_request
from .scheduler import Scheduler
from .slo import Classifier

log = logging.getLogger("sloproxy")


class Proxy:
    """Everything one proxy replica runs: backend pool, forwarder, metrics."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.pool = BackendPool(config.backends, config.health, config.load_polling)
        self.metrics = ProxyMetrics(self.pool)
        self.policy = load_policy(config.policy.name, config.policy.params)
        self.scheduler = Scheduler(self.policy, self.pool, config.scheduling)
        self.metrics.attach(self.scheduler)
        self.classifier = Classifier(config.slo_classes, config.default_class, config.tenants, config.models)
        self.forwarder = Forwarder(self.pool, self.scheduler, config.limits, self.metrics)
        self.estimates = LengthEstimates.from_config(config.predictor, self.policy.uses_predictions)
        self.metrics.attach_predictor(self.estimates)

    async def start(self) -> None:
        await self.pool.start()
        self.scheduler.start()
        self.estimates.start()
        if not self.pool.ready:
            log.warning("no backend is healthy at start; /ready reports 503 until one is")

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.estimates.stop()
        await self.forwarder.stop()
        await self.pool.stop()

    # ----- routes -------------------------------------------------------------------------------
    async def chat(self, request: Request, response: Response) -> None:
        await self._openai(request, response, "chat")

    async def completions(self, request: Request, response: Response) -> None:
        await self._openai(request, response, "completions")

    async def _openai(self, http: Request, response: Response, kind: Kind) -> None:
        started = time.monotonic()
        proxy_request = parse_request(kind, http.body, http.headers.get("x-request-id"))
        if self.estimates.enabled:
            self.estimates.estimate(proxy_request)  # before classify: deadlines depend on the estimate
        proxy_request.classify(*self.classifier.classify(http.headers, proxy_request.model))
        metrics = self.metrics
        metrics.in_flight += 1
        outcome = "error"
        try:
            await self.forwarder.forward(response, proxy_request)
            if proxy_request.disconnected:
                outcome = "client_disconnected"
                metrics.disconnects.labels(proxy_request.model).inc()
            else:
                outcome = "ok"
                self.estimates.finished(proxy_request)
        except ProxyError as error:
            outcome = f"http_{error.status}"
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome = "client_disconnected"
            metrics.disconnects.labels(proxy_request.model).inc()
            raise
        finally:
            metrics.in_flight -= 1
            metrics.finished(
                proxy_request.model,
                outcome,
                time.monotonic() - started,
                proxy_request.prompt_tokens,
                proxy_request.completion_tokens,
            )

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
    server = HTTPServer(max_body_bytes=proxy.config.limits.max_body_bytes)
    server.route("POST", "/v1/chat/completions", proxy.chat)
    server.route("POST", "/v1/completions", proxy.completions)
    server.route("GET", "/v1/models", proxy.models)
    server.route("GET", "/health", proxy.health)
    server.route("GET", "/ready", proxy.ready)
    server.route("GET", "/metrics", proxy.prometheus)
    return server
