"""HTTP plumbing the three emulated engines share: body decoding, JSON replies, SSE, control routes."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from ..loop_lag import LoopLagMonitor
from .faults import GENERATION_PATHS, set_fault
from .instance import Instance

T = TypeVar("T")
INSTANCE_KEY: web.AppKey[Instance] = web.AppKey("instance", Instance)
LOOP_LAG_KEY: web.AppKey[LoopLagMonitor] = web.AppKey("loop_lag", LoopLagMonitor)
_encode = msgspec.json.encode


class ApiError(Exception):
    """Raised by handlers; the middleware turns it into the engine's own error body.

    ``body`` is JSON-encoded, except a ``str`` body, which is sent as plain text (axum's extractor
    rejections in TGI). ``stream_body`` is the encoded JSON the engine sends instead, after HTTP 200,
    when the request streams and the engine only finds the problem once the stream has started
    (TGI's validation and overload, SGLang's scheduler-side refusals); None: a real HTTP status.
    """

    def __init__(
        self, status: int, body: Any, headers: dict[str, str] | None = None, *, stream_body: bytes | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
        self.stream_body = stream_body


@web.middleware
async def api_error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        fault = request.app[INSTANCE_KEY].fault
        if fault is not None and request.path in GENERATION_PATHS:  # injected (faults.py); None normally
            return await fault.apply(request, handler)
        return await handler(request)
    except ApiError as error:
        if isinstance(error.body, str):
            return web.Response(text=error.body, status=error.status, headers=error.headers)
        return json_response(error.body, status=error.status, headers=error.headers)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json", headers=headers)


def encode(obj: Any) -> bytes:
    return _encode(obj)


@dataclass(frozen=True, slots=True)
class DecodeProblem:
    """Why a request body did not decode, in the terms the engines' own validators report."""

    kind: str  # "json_invalid" (not JSON), "missing" (a required field), "invalid" (wrong type or value)
    loc: tuple[str | int, ...]  # where, from the body's root: ("messages",), ("messages", 0, "role")
    detail: str  # the decoder's own wording

    @property
    def syntax(self) -> bool:
        return self.kind == "json_invalid"

    def dotted(self, root: str = "body") -> str:
        return ".".join([root, *map(str, self.loc)])


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _problem(exc: Exception) -> DecodeProblem:
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return DecodeProblem("json_invalid", (), text)
    loc: list[str | int] = []
    at = _AT.search(text)
    if at:
        for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", at.group("path")):
            loc.append(name if name else int(index))
        text = text[: at.start()]
    missing = _MISSING.match(text)
    if missing:
        return DecodeProblem("missing", (*loc, missing.group("field")), text)
    return DecodeProblem("invalid", tuple(loc), text)


async def decode_request(request: web.Request, type_: type[T], error: Callable[[DecodeProblem], ApiError]) -> T:
    """Decode and validate the JSON body into ``type_``; a bad body becomes ``error(problem)``."""
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise error(_problem(exc)) from None


async def decode_body(request: web.Request, type_: type[T], error: Callable[[str], ApiError]) -> T:
    """Decode and validate the JSON body into ``type_``; malformed input becomes ``error(message)``."""

    def message(problem: DecodeProblem) -> ApiError:
        what = "Invalid JSON body" if problem.syntax else "Invalid request"
        return error(f"{what}: {problem.detail}")

    return await decode_request(request, type_, message)


async def json_object(request: web.Request, error: Callable[[str], ApiError]) -> dict[str, Any]:
    """A JSON object body for the small admin routes, or ``error(message)``."""
    try:
        body = await request.json()
    except ValueError:
        raise error("Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise error("The request body must be a JSON object.")
    return body


def instance_of(request: web.Request) -> Instance:
    return request.app[INSTANCE_KEY]


def unix_now() -> int:
    return int(time.time())


async def start_sse(request: web.Request, extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(extra_headers or {})},
    )
    await response.prepare(request)
    return response


async def emulator_state(request: web.Request) -> web.Response:
    """Test hook (not an engine route): the engine's internal state at this instant."""
    instance = instance_of(request)
    engine = instance.engine
    return json_response(
        {
            "name": instance.config.name,
            "engine": engine.kind,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "kv_blocks_total": engine.kv.num_blocks,
            "kv_blocks_used": engine.kv.used,
            "kv_usage": engine.kv.usage,
            "preemptions": engine.stats.preemptions,
            "peak_in_engine": engine.stats.peak_in_engine,
            "finished": dict(engine.stats.finished),
            "generation_tokens": engine.stats.generation_tokens,
            "sleeping": engine.sleeping,
            "emulated_now": instance.now(),
            "speedup": instance.speedup,
        }
    )


async def emulator_health(request: web.Request) -> web.Response:
    """Test hook: ``{"healthy": false}`` makes ``/health`` fail as a dead engine's would."""
    body = await request.json()
    instance_of(request).healthy = bool(body.get("healthy", True))
    return json_response({"healthy": instance_of(request).healthy})


async def emulator_loop_lag(request: web.Request) -> web.Response:
    """Test hook: the emulator process's event-loop lag (``?reset=1`` starts a new window)."""
    monitor = request.app.get(LOOP_LAG_KEY)
    if monitor is None:
        return json_response({"samples": 0})
    summary = monitor.summary()
    if request.query.get("reset"):
        monitor.reset()
    return json_response(summary)


def new_app(instance: Instance) -> web.Application:
    app = web.Application(middlewares=[api_error_middleware], client_max_size=64 * 1024 * 1024)
    app[INSTANCE_KEY] = instance
    app.router.add_get("/_emulator/state", emulator_state)
    app.router.add_post("/_emulator/health", emulator_health)
    app.router.add_get("/_emulator/loop_lag", emulator_loop_lag)
    app.router.add_post("/_emulator/fault", lambda request: set_fault(request, instance))
    return app
