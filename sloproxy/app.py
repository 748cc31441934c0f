"""The proxy's HTTP surface: OpenAI routes plus health, readiness, metrics (served by http_server.py on uvloop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import msgspec

from . import openapi
from .access_log import AccessLog
from .admin import AdminAPI
from .auth import Authenticator, check_model_allowed
from .backends import BackendPool
from .config import ProxyConfig, load_config
from .errors import ProxyError
from .estimates import LengthEstimates
from .forward import Forwarder
from .http_server import HTTPServer, Request, Response
from .outlier import OutlierDetector
from .placement_loop import PlacementCollector, PlacementLoop
from .plugins import load_policy
from .proxy_metrics import ProxyMetrics
from .ratelimit import TenantLimits
from .regions import RegionRouter
from .request import Kind, parse_request
from .scheduler import Scheduler
from .slo import DEFAULT_CLASSES, Classifier
from .state import SharedState
from .swapping import SwapCollector, Swapper
from .tracing import Tracing

if TYPE_CHECKING:
    from .state.redis_state import RedisCoordinator

log = logging.getLogger("sloproxy")


class Proxy:
    """Everything one proxy replica runs: backend pool, forwarder, metrics."""

    # Config sections a reload applies live; any other change is reported as needing a restart.
    LIVE_SECTIONS = ("policy", "slo_classes", "default_class", "tenants", "models", "admin", "regions")

    def __init__(self, config: ProxyConfig, tracing: Tracing | None = None, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # what POST /admin/reload re-reads (None: reload is refused)
        # None unless an exporter is configured (tracing: or OTEL_TRACES_EXPORTER): the request path
        # then does nothing for traces but an `is not None` check.
        self.tracing = tracing if tracing is not None else Tracing.from_config(config.tracing)
        if self.tracing is not None:
            self.tracing.policy = config.policy.name
        self.pool = BackendPool(config.backends, config.health, config.load_polling, context=config.context)
        self.access_log = AccessLog(config.access_log.path) if config.access_log.enabled else None
        self.metrics = ProxyMetrics(self.pool)
        self.policy = load_policy(config.policy.name, config.policy.params)
        self.coordinator: RedisCoordinator | None = None
        state = None
        if config.state.backend == "redis":  # several replicas: admission by shares (state/redis_state.py)
            from .state.redis_state import RedisCoordinator

            self.coordinator = RedisCoordinator(config.state, [b.name for b in self.pool.backends])
            state = SharedState(self.coordinator)
        self.scheduler = Scheduler(self.policy, self.pool, config.scheduling, state=state)
        router = RegionRouter(config.regions, self.pool.backends, config.slo_classes or DEFAULT_CLASSES)
        self.regions: RegionRouter | None = router if router.active else None
        self.scheduler.regions = self.regions
        self.metrics.attach(self.scheduler)
        if self.coordinator is not None:
            self.metrics.attach_state(self.coordinator)
        self.classifier = Classifier(config.slo_classes, config.default_class, config.tenants, config.models)
        self.authenticator = Authenticator(config.tenants, config.admin.api_keys)
        self.limits = TenantLimits(self.coordinator)
        # Circuit breaking: backends whose requests keep failing are ejected for a while (outlier.py).
        self.outlier = OutlierDetector(config.outlier, self.pool) if config.outlier.enabled else None
        if self.outlier is not None:
            self.metrics.attach_outlier(self.outlier)
        # Model swapping between backends sharing a GPU group (swapping.py); idle without groups.
        self.swapper = Swapper(self.pool, config.swapping)
        if self.swapper.enabled:
            self.swapper.waiting = self.scheduler.waiting
            self.swapper.on_routable = self.scheduler.dispatch_for
            self.scheduler.swapper = self.swapper
            self.metrics.registry.register(SwapCollector(self.swapper))
        # Proactive placement over those groups (placement_loop.py): off unless swapping.placement.enabled.
        placement = PlacementLoop(self.swapper, config.swapping.placement)
        self.placement: PlacementLoop | None = placement if placement.enabled else None
        if self.placement is not None:
            self.metrics.registry.register(PlacementCollector(self.placement))
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
            await self.coordinator.start()  # Redis down: degraded (the log says so)
            if self.coordinator.degraded and not self.config.state.start_without_redis:
                await self.pool.stop()
                url = self.config.state.url or ""
                raise ConnectionError(
                    f"Redis at {url.split('@')[-1]} is unreachable at start (state.start_without_redis: true "
                    "starts degraded instead)"
                )
            self.scheduler.shares_changed()
        await self.swapper.start()  # reads who sleeps; before the first request is scheduled
        if self.placement is not None:
            self.placement.start()
        self.scheduler.start()
        self.estimates.start()
        warning = self.authenticator.warning()
        if warning is not None:
            log.warning("%s", warning)
        if not self.pool.ready:
            log.warning("no backend is healthy at start; /ready reports 503 until one is")

    async def stop(self) -> None:
        await self.scheduler.stop()
        if self.placement is not None:
            await self.placement.stop()
        await self.swapper.stop()
        await self.estimates.stop()
        await self.forwarder.stop()
        if self.outlier is not None:
            self.outlier.stop()
        await self.limits.stop()
        if self.coordinator is not None:
            await self.coordinator.stop()  # after the last request: its capacity returns to the fleet now
        await self.pool.stop()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:  # flushes buffered spans: blocking, so off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    # ----- routes -------------------------------------------------------------------------------
    def chat(self, request: Request, response: Response) -> Awaitable[None]:
        """``POST /v1/chat/completions``. Returns the coroutine itself rather than awaiting it: one frame
        less for every resumption of the request's task (a queued request resumes twice: once
        dispatched, once its reply came)."""
        return self._openai(request, response, "chat")

    def completions(self, request: Request, response: Response) -> Awaitable[None]:
        """``POST /v1/completions`` (see :meth:`chat`)."""
        return self._openai(request, response, "completions")

    async def _openai(self, http: Request, response: Response, kind: Kind) -> None:
        started = time.monotonic()
        trace = self.tracing.begin(http.headers, kind, started) if self.tracing is not None else None
        metrics = self.metrics
        metrics.in_flight += 1
        proxy_request = tenant = None
        outcome = "error"
        error: BaseException | None = None
        try:
            tenant = self.authenticator.tenant(http.headers)  # 401 before anything else is read
            proxy_request = parse_request(kind, http.body, http.headers.get("x-request-id"), self.config.limits)
            proxy_request.received_at = started
            proxy_request.trace = trace
            check_model_allowed(tenant, proxy_request.model)
            if self.placement is not None:
                self.placement.observe(proxy_request.model, proxy_request.est_prompt_tokens)
            if self.estimates.enabled:
                self.estimates.prior(proxy_request)  # before classify: deadlines depend on the estimate
            name, slo = self.classifier.classify(tenant, http.headers, proxy_request.model)
            proxy_request.classify(name, slo, tenant.band if tenant is not None else None)
            if self.regions is not None:
                proxy_request.regions = self.regions.preference(tenant, http.headers)
            if tenant is not None and tenant.rate_limited:
                await self.limits.admit(tenant, proxy_request)
            await self.forwarder.forward(response, proxy_request)
            if proxy_request.disconnected:
                outcome = "client_disconnected"
                metrics.disconnects.labels(proxy_request.model).inc()
            elif proxy_request.failed_mid_stream:  # the client got an error frame, not its reply: a miss
                outcome = "http_502"
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
            if proxy_request is not None and proxy_request.tokens_charged:
                self.limits.settle(tenant, proxy_request)  # type: ignore[arg-type]
            ended = time.monotonic()
            met = metrics.finished(proxy_request, outcome, error, ended)
            if self.access_log is not None:
                self.access_log.write(proxy_request, outcome, error, met, ended, started)
            if trace is not None:
                trace.finish(proxy_request, outcome, error, met, ended)
            error = None  # this frame <-> the traceback: a cycle would keep the body alive until a GC pass

    def _visible_models(self, request: Request) -> list[str]:
        tenant = self.authenticator.tenant(request.headers)
        served = self.pool.models()
        if tenant is not None and tenant.models is not None:
            served = [model for model in served if model in tenant.models]
        return served

    def _model_card(self, model: str) -> dict[str, object]:
        """OpenAI's model object, with the largest context window among the model's backends (as vLLM's
        ``max_model_len``: the longest request the proxy can place; None while no window is known)."""
        windows = [b.context.total for b in self.pool.by_model.get(model, ()) if b.context is not None]
        return {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "sloproxy",
            "max_model_len": max(windows) if windows else None,
        }

    async def models(self, request: Request, response: Response) -> None:
        data = [self._model_card(model) for model in self._visible_models(request)]
        response.send(200, msgspec.json.encode({"object": "list", "data": data}))

    async def model(self, request: Request, response: Response) -> None:
        """``GET /v1/models/{id}`` (the SDKs' ``models.retrieve``); ids may hold slashes."""
        model = unquote(request.path[len("/v1/models/") :])
        if model not in self._visible_models(request):
            raise ProxyError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        response.send(200, msgspec.json.encode(self._model_card(model)))

    async def health(self, request: Request, response: Response) -> None:
        response.send(200, b'{"status":"ok"}')

    async def ready(self, request: Request, response: Response) -> None:
        healthy = [b.name for b in self.pool.backends if b.healthy]
        body = msgspec.json.encode({"ready": bool(healthy), "healthy_backends": healthy})
        response.send(200 if healthy else 503, body)

    async def prometheus(self, request: Request, response: Response) -> None:
        response.send(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    # ----- reload -------------------------------------------------------------------------------
    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the config file and apply its live sections; returns (applied, needing a restart).
        A config that does not load changes nothing (the error says why). Of the backends, their
        ``region`` and ``pool`` tags apply live (the region router is rebuilt; held work moves to it);
        any other backend change needs a restart."""
        if self.config_path is None:
            raise ProxyError(409, "This proxy was not started from a config file: nothing to reload.")
        new = load_config(self.config_path)
        old = self.config
        changed = [f for f in ProxyConfig.__struct_fields__ if f != "listen" and getattr(new, f) != getattr(old, f)]
        live = [f for f in changed if f in self.LIVE_SECTIONS]
        policy = load_policy(new.policy.name, new.policy.params) if "policy" in live else None
        tags = {b.name: (b.region, b.pool) for b in new.backends}
        backends = [
            msgspec.structs.replace(b, region=tags[b.name][0], pool=tags[b.name][1]) if b.name in tags else b
            for b in old.backends
        ]
        retagged = backends != old.backends
        classifier = Classifier(new.slo_classes, new.default_class, new.tenants, new.models)
        authenticator = Authenticator(new.tenants, new.admin.api_keys)
        # Nothing above changed anything: from here on every step succeeds.
        self.classifier, self.authenticator = classifier, authenticator
        if policy is not None:
            self.scheduler.replace_policy(policy)
            self.policy = policy
            if self.tracing is not None:
                self.tracing.policy = new.policy.name
        if retagged:
            by_name = {b.name: b for b in backends}
            for backend in self.pool.backends:
                backend.config = by_name[backend.name]
        if retagged or "regions" in live or "slo_classes" in live:  # held classes follow the SLO classes
            router = RegionRouter(new.regions, self.pool.backends, new.slo_classes or DEFAULT_CLASSES)
            self.regions = router if router.active else None
            self.scheduler.replace_regions(self.regions)
        self.config = msgspec.structs.replace(old, **{f: getattr(new, f) for f in live}, backends=backends)
        restart = [f for f in changed if f not in self.LIVE_SECTIONS and (f != "backends" or backends != new.backends)]
        if retagged:
            live.append("backends.region/pool")
        log.warning(
            "config reloaded from %s: applied %s%s",
            self.config_path,
            ", ".join(live) or "nothing (unchanged)",
            f"; needs a restart: {', '.join(restart)}" if restart else "",
        )
        warning = authenticator.warning()
        if warning is not None:
            log.warning("%s", warning)
        return live, restart


def build_server(proxy: Proxy) -> HTTPServer:
    """The proxy's routes on the lean HTTP server (see http_server.py for why not aiohttp's)."""
    server = HTTPServer.from_limits(proxy.config.limits)
    server.route("POST", "/v1/chat/completions", proxy.chat)
    server.route("POST", "/v1/completions", proxy.completions)
    server.route("GET", "/v1/models", proxy.models)
    server.route("GET", "/v1/models/*", proxy.model)
    server.route("GET", "/health", proxy.health)
    server.route("GET", "/ready", proxy.ready)
    server.route("GET", "/metrics", proxy.prometheus)
    server.route("GET", "/openapi.json", openapi.route(proxy.config.limits, openapi.admin_paths()))
    AdminAPI(proxy).routes(server)
    return server
