"""The proxy's HTTP surface (aiohttp on uvloop): OpenAI routes plus health, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from .backends import BackendPool
from .config import ProxyConfig
from .errors import ProxyError, error_body
from .forward import Forwarder
from .plugins import load_policy
from .proxy_metrics import ProxyMetrics
from .request import Kind, parse_request
from .scheduler import Scheduler
from .slo import Classifier

log = logging.getLogger("sloproxy")
JSON = "application/json"


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

    async def start(self) -> None:
        await self.pool.start()
        self.scheduler.start()
        if not self.pool.ready:
            log.warning("no backend is healthy at start; /ready reports 503 until one is")

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.forwarder.stop()
        await self.pool.stop()

    # ----- routes -------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, "completions")

    async def _openai(self, http: web.Request, kind: Kind) -> web.StreamResponse:
        started = time.monotonic()
        raw = await self._read_body(http)
        proxy_request = parse_request(kind, raw, http.headers.get("X-Request-Id"))
        proxy_request.classify(*self.classifier.classify(http.headers, proxy_request.model))
        metrics = self.metrics
        metrics.in_flight.inc()
        outcome = "error"
        try:
            response = await self.forwarder.forward(http, proxy_request)
            if proxy_request.disconnected:
                outcome = "client_disconnected"
                metrics.disconnects.labels(proxy_request.model).inc()
            else:
                outcome = "ok"
            return response
        except ProxyError as error:
            outcome = f"http_{error.status}"
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome = "client_disconnected"
            metrics.disconnects.labels(proxy_request.model).inc()
            raise
        finally:
            metrics.in_flight.dec()
            metrics.finished(
                proxy_request.model,
                outcome,
                time.monotonic() - started,
                proxy_request.prompt_tokens,
                proxy_request.completion_tokens,
            )

    async def _read_body(self, http: web.Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        if http.content_length is not None and http.content_length > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.")
        try:
            return await http.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.") from None

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "sloproxy"} for model in self.pool.models()]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        healthy = [b.name for b in self.pool.backends if b.healthy]
        return web.json_response({"ready": bool(healthy), "healthy_backends": healthy}, status=200 if healthy else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-format error; nothing escapes as aiohttp's text pages."""
    try:
        return await handler(request)
    except ProxyError as error:
        return web.Response(body=error.body(), status=error.status, content_type=JSON, headers=error.headers)
    except web.HTTPException as exc:  # routing: 404 / 405 from aiohttp itself
        if exc.status < 400:
            raise
        return web.Response(body=error_body(exc.status, exc.reason), status=exc.status, content_type=JSON)
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return web.Response(body=error_body(500, "Internal proxy error."), status=500, content_type=JSON)


def build_app(proxy: Proxy) -> web.Application:
    # The body limit is enforced in Proxy._read_body with an OpenAI-format 413; aiohttp's own is a backstop.
    app = web.Application(middlewares=[openai_errors], client_max_size=proxy.config.limits.max_body_bytes + 1)
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    app.router.add_get("/ready", proxy.ready)
    app.router.add_get("/metrics", proxy.prometheus)

    async def on_startup(app: web.Application) -> None:
        await proxy.start()

    async def on_cleanup(app: web.Application) -> None:
        await proxy.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
