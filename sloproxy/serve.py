"""``sloproxy serve``: run one proxy replica until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from .app import Proxy, build_server
from .config import ProxyConfig
from .errors import ProxyError

log = logging.getLogger("sloproxy")


def _reload(proxy: Proxy) -> None:
    """SIGHUP: the same as ``POST /admin/reload``; a config that does not load changes nothing."""
    try:
        proxy.reload()
    except (ValueError, OSError, ProxyError) as exc:
        log.error("config not reloaded: %s", exc)


async def run_proxy(
    config: ProxyConfig, ready: Callable[[str], None] | None = None, config_path: Path | None = None
) -> None:
    proxy = Proxy(config, config_path=config_path)
    server = build_server(proxy)
    await proxy.start()
    # Everything built so far lives as long as the process: keep it out of every future collection,
    # so the cyclic GC's pauses scale with per-request garbage only.
    gc.collect()
    gc.freeze()
    try:
        await server.start(config.listen.host, config.listen.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        if config_path is not None:
            with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
                loop.add_signal_handler(signal.SIGHUP, _reload, proxy)
        address = f"http://{config.listen.host}:{config.listen.port}"
        (ready or print)(
            f"sloproxy serving on {address} ({len(config.backends)} backends, policy {config.policy.name})"
        )
        await stop.wait()
        await server.stop()
    finally:
        await proxy.stop()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
