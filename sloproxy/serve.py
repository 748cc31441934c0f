"""``sloproxy serve``: run one proxy replica until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .app import Proxy, build_app
from .config import ProxyConfig


async def run_proxy(config: ProxyConfig, ready: Callable[[str], None] | None = None) -> None:
    proxy = Proxy(config)
    app = build_app(proxy)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts upstream.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, backlog=2048, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    address = f"http://{config.listen.host}:{config.listen.port}"
    (ready or print)(f"sloproxy serving on {address} ({len(config.backends)} backends, policy {config.policy.name})")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
