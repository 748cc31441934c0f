"""The admin API: fleet state, the policy, draining a backend, reloading the config.

Every route needs the admin key (auth.py); none ever shows a key. Routes:

* ``GET /admin/fleet``: each backend's health, drain state, load and budgets; queue depths; counters;
* ``GET /admin/policy``: the policy in force and its parameters;
* ``POST /admin/drain`` ``{"backend": NAME}`` and ``POST /admin/undrain``: a draining backend gets
  no new requests; those in flight finish (``in_flight`` in the reply says how many are left);
* ``POST /admin/reload``: re-read the config file and apply what can change live (tenants, keys,
  rate limits, SLO classes and defaults, the policy); what needs a restart is listed, not applied.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec

from .errors import ProxyError
from .http_server import JSON, HTTPServer, Request, Response

if TYPE_CHECKING:
    from .app import Proxy

log = logging.getLogger("sloproxy.admin")


class _BackendName(msgspec.Struct, forbid_unknown_fields=True):
    backend: str


def _placement_state(placement: Any) -> dict[str, Any]:
    """What placement measured and last decided (None before its first evaluation)."""
    last = placement.last
    return {
        "demand_rps": placement.demand(),
        "capacity_rps": placement.capacity(),
        "interval_s": placement.interval.interval_s,
        "outcomes": dict(placement.outcomes),
        "last": None
        if last is None
        else {
            "groups": {g: sorted(models) for g, models in last.groups.items()},
            "swaps": [list(s) for s in last.swaps],
            "adopted": last.adopt,
            "reason": last.reason,
        },
    }


def _backend_state(backend: Any) -> dict[str, Any]:
    load = backend.load
    return {
        "name": backend.name,
        "region": backend.config.region,
        "pool": backend.config.pool,
        "engine": backend.config.engine,
        "url": backend.url,
        "models": sorted(backend.models),
        "healthy": backend.probe_healthy,
        "draining": backend.draining,
        "ejected": backend.ejected,  # the circuit breaker took it out (outlier.py)
        "in_flight": backend.in_flight,
        "in_flight_here": backend.mine,
        "budget": backend.budget,
        "kv_reserved_tokens": backend.kv_reserved_tokens,
        "context_window": None if backend.context is None else backend.context.total,  # tokens, prompt + reply
        "context_window_source": None if backend.context is None else backend.context.source,
        "load_reported": backend.load_reported,  # False: /metrics answers without the engine's load figures
        "load": None
        if load is None
        else {
            "running": load.running,
            "waiting": load.waiting,
            "kv_usage": load.kv_usage,
            "stale": backend.load_is_stale,
        },
    }


class AdminAPI:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def routes(self, server: HTTPServer) -> None:
        server.route("GET", "/admin/fleet", self._guarded(self.fleet))
        server.route("GET", "/admin/policy", self._guarded(self.policy))
        server.route("POST", "/admin/drain", self._guarded(self.drain))
        server.route("POST", "/admin/undrain", self._guarded(self.undrain))
        server.route("POST", "/admin/reload", self._guarded(self.reload))

    def _guarded(self, handler: Any) -> Any:
        async def guarded(request: Request, response: Response) -> None:
            self.proxy.authenticator.check_admin(request.headers)
            await handler(request, response)

        return guarded

    async def fleet(self, request: Request, response: Response) -> None:
        proxy = self.proxy
        scheduler = proxy.scheduler
        queues: dict[str, dict[str, int]] = {}
        for (model, slo_class), depth in scheduler.state.queue_depths().items():
            queues.setdefault(model, {})[slo_class] = depth
        body = {
            "replica": proxy.coordinator.replica_id if proxy.coordinator is not None else None,
            "state": proxy.config.state.backend,
            "policy": proxy.config.policy.name,
            "backends": [_backend_state(b) for b in proxy.pool.backends],
            "queues": queues,
            "counts": dict(scheduler.counts),
        }
        if proxy.placement is not None:
            body["placement"] = _placement_state(proxy.placement)
        response.send(200, msgspec.json.encode(body), JSON)

    async def policy(self, request: Request, response: Response) -> None:
        config = self.proxy.config.policy
        body = {"name": config.name, "params": config.params, "queued": self.proxy.scheduler.policy.queued}
        response.send(200, msgspec.json.encode(body), JSON)

    async def drain(self, request: Request, response: Response) -> None:
        await self._set_draining(request, response, True)

    async def undrain(self, request: Request, response: Response) -> None:
        await self._set_draining(request, response, False)

    async def _set_draining(self, request: Request, response: Response, draining: bool) -> None:
        try:
            name = msgspec.json.decode(request.body, type=_BackendName).backend
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProxyError(400, f'Expected {{"backend": NAME}}: {exc}', param="backend") from None
        backend = self.proxy.pool.set_draining(name, draining)
        if backend is None:
            raise ProxyError(404, f"There is no backend `{name}`.", param="backend")
        log.warning("admin: backend %s %s", name, "draining" if draining else "back in service")
        if not draining:
            self.proxy.scheduler.dispatch_for(backend)
        response.send(200, msgspec.json.encode(_backend_state(backend)), JSON)

    async def reload(self, request: Request, response: Response) -> None:
        try:
            applied, needs_restart = self.proxy.reload()
        except (ValueError, OSError) as exc:  # bad config, unreadable file, a policy refusing its parameters
            raise ProxyError(400, f"The config was not reloaded: {exc}", code="invalid_config") from None
        body = {"reloaded": True, "applied": applied, "needs_restart": needs_restart}
        response.send(200, msgspec.json.encode(body), JSON)
