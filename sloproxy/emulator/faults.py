"""Fault injection for tests and drills: an emulated instance that misbehaves on command.

``POST /_emulator/fault {"mode": ...}`` sets how the instance answers its generation routes
(``/v1/chat/completions``, ``/v1/completions``, ``/generate``, ``/generate_stream``); every other
route (health, metrics, the ``/_emulator/`` hooks) keeps working, as on a real engine whose
serving path breaks while its HTTP server lives. ``{"mode": "none"}`` heals it. The normal path
pays one attribute check: the middleware calls :meth:`Fault.apply` only while a fault is set.

Modes (durations are wall seconds):

* ``hang``: read the request, never answer (until the client gives up).
* ``slow_first_byte``: wait ``delay_s`` before the engine even sees the request, then serve it.
* ``garbage``: answer 200 with bytes no engine would send (SSE frames without JSON in a stream,
  a non-JSON body otherwise).
* ``reset``: reset the connection (TCP RST) as soon as the request arrives.
* ``kill_mid_stream``: serve normally, then reset the connection ``after_s`` into the reply.
* ``flap_health``: ``/health`` alternates between up and down every ``period_s``; while down the
  generation routes reset their connections too (a crash-looping engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import msgspec
from aiohttp import web

if TYPE_CHECKING:
    from .instance import Instance

Mode = Literal["none", "hang", "slow_first_byte", "garbage", "reset", "kill_mid_stream", "flap_health"]
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FaultSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /_emulator/fault``."""

    mode: Mode = "none"
    delay_s: float = 1.0  # slow_first_byte
    after_s: float = 0.5  # kill_mid_stream
    period_s: float = 1.0  # flap_health: length of each up and each down phase


def reset_connection(request: web.Request) -> None:
    """Drop the client's connection with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _never() -> web.StreamResponse:
    """Wait until aiohttp cancels the handler (the client, or our own reset, closed the connection)."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


class Fault:
    """One active fault on one instance; ``stop()`` undoes what it changed (the flapping task)."""

    def __init__(self, spec: FaultSpec, instance: Instance) -> None:
        self.spec = spec
        self.instance = instance
        self.down = False  # flap_health: in the down phase
        self._task: asyncio.Task | None = None
        if spec.mode == "flap_health":
            self._task = asyncio.get_running_loop().create_task(self._flap(), name=f"flap-{instance.config.name}")

    async def _flap(self) -> None:
        while True:
            await asyncio.sleep(self.spec.period_s)
            self.down = not self.down
            self.instance.healthy = not self.down

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self.instance.healthy = True

    async def apply(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one generation request the faulty way."""
        mode = self.spec.mode
        if mode == "slow_first_byte":
            await asyncio.sleep(self.spec.delay_s)
            return await handler(request)
        if mode == "kill_mid_stream":
            timer = asyncio.get_running_loop().call_later(self.spec.after_s, reset_connection, request)
            try:
                return await handler(request)
            finally:
                timer.cancel()
        if mode == "flap_health" and not self.down:
            return await handler(request)
        body = await request.read()
        if mode == "hang":
            return await _never()
        if mode == "garbage":
            return await _garbage(request, body)
        reset_connection(request)  # reset, or flap_health while down
        return await _never()


async def _garbage(request: web.Request, body: bytes) -> web.StreamResponse:
    try:
        stream = request.path == "/generate_stream" or json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        stream = False
    if not stream:
        return web.Response(status=200, body=b"<html>\x00\x17 not a completion", content_type="application/json")
    response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: \x00\x17garbage, not JSON\n\ndata: {{{\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


async def set_fault(request: web.Request, instance: Instance) -> web.Response:
    """``POST /_emulator/fault``: replace the instance's fault (``mode: none`` clears it)."""
    try:
        spec = msgspec.json.decode(await request.read() or b"{}", type=FaultSpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return web.json_response({"error": f"invalid fault: {exc}"}, status=400)
    if instance.fault is not None:
        instance.fault.stop()
    instance.fault = None if spec.mode == "none" else Fault(spec, instance)
    return web.json_response(msgspec.to_builtins(spec))
