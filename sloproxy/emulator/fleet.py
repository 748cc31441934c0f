"""Fleet files and serving: many emulated instances on their own ports from one process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
from aiohttp import web

from ..loop_lag import LoopLagMonitor
from . import sglang_api, tgi_api, vllm_api
from .http_common import LOOP_LAG_KEY
from .instance import Instance, InstanceConfig
from .lengths import LengthTable
from .profiles import DEFAULT_PROFILE, get_profile
from .versions import parse_version

BUILDERS: dict[str, Callable[[Instance], web.Application]] = {
    "vllm": vllm_api.build_app,
    "tgi": tgi_api.build_app,
    "sglang": sglang_api.build_app,
}


class InstanceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One line of a fleet file; every field but name/engine/model has a default.

    ``port`` is needed only to serve the instance (``sloproxy emulate``); simulate/sweep ignore it."""

    name: str
    engine: Literal["vllm", "tgi", "sglang"]
    model: str
    port: int | None = None
    profile: str = DEFAULT_PROFILE
    host: str | None = None
    speedup: float | None = None
    lengths: str | None = None
    max_model_len: int | None = None
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    max_num_seqs: int | None = None
    max_concurrent_requests: int = 128
    max_queued_requests: int | None = None
    prefix_caching: bool = True
    legacy_errors: bool = False  # vLLM: flat {"object": "error", ...} error bodies
    sse_space: bool | None = None  # TGI: force "data: " (True) or "data:" (False); None: as engine_version
    start_asleep: Literal[0, 1, 2] = 0  # 1: weights in host memory (slept at level 1); 2: cold, not loaded
    engine_version: str | None = None  # behave as this release (versions.py); None: the newest modelled
    disable_log_stats: bool = False  # vLLM: /metrics answers without the engine's families
    request_header_overrides: bool = False  # SGLang: honour x-override-* headers (the env opt-in)

    def __post_init__(self) -> None:
        if self.engine_version is not None:
            parse_version(self.engine_version)  # a bad version fails when the fleet file is read


class FleetSpec(msgspec.Struct, forbid_unknown_fields=True):
    instances: list[InstanceSpec]
    host: str = "127.0.0.1"
    speedup: float = 1.0
    lengths: str | None = None


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and validate a fleet YAML file; errors name the offending field."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    try:
        fleet = msgspec.convert(raw, FleetSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None
    names = [i.name for i in fleet.instances]
    ports = [i.port for i in fleet.instances if i.port is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: instance names must be unique")
    if len(set(ports)) != len(ports):
        raise ValueError(f"{path}: instance ports must be unique")
    return fleet


def instance_config(
    spec: InstanceSpec, fleet: FleetSpec | None = None, tables: dict[str, LengthTable] | None = None
) -> InstanceConfig:
    if spec.port is None:
        raise ValueError(f"instance {spec.name}: no port (emulate serves every instance on its own port)")
    speedup = spec.speedup or (fleet.speedup if fleet else 1.0)
    if speedup <= 0:
        raise ValueError(f"instance {spec.name}: speedup must be positive")
    lengths_path = spec.lengths or (fleet.lengths if fleet else None)
    table = None
    if lengths_path:
        tables = tables if tables is not None else {}
        table = tables.get(lengths_path) or tables.setdefault(lengths_path, LengthTable.load(lengths_path))
    return InstanceConfig(
        name=spec.name,
        engine=spec.engine,
        model=spec.model,
        profile=get_profile(spec.profile),
        port=spec.port,
        host=spec.host or (fleet.host if fleet else "127.0.0.1"),
        speedup=speedup,
        max_model_len=spec.max_model_len,
        priority_scheduling=spec.scheduling_policy == "priority",
        max_num_seqs=spec.max_num_seqs,
        max_concurrent_requests=spec.max_concurrent_requests,
        max_queued_requests=spec.max_queued_requests,
        lengths=table,
        prefix_caching=spec.prefix_caching,
        legacy_errors=spec.legacy_errors,
        sse_space=spec.sse_space,
        start_asleep=spec.start_asleep,
        engine_version=spec.engine_version,
        disable_log_stats=spec.disable_log_stats,
        request_header_overrides=spec.request_header_overrides,
    )


class RunningFleet:
    """Started instances with their HTTP servers; ``stop()`` closes everything."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._runners: list[web.AppRunner] = []
        self.loop_lag = LoopLagMonitor()

    async def add(self, config: InstanceConfig) -> Instance:
        instance = Instance(config)
        app = BUILDERS[config.engine](instance)
        app[LOOP_LAG_KEY] = self.loop_lag
        # handler_cancellation: a client that disconnects cancels its handler -> engine abort.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        instance.start()
        self.instances[config.name] = instance
        self._runners.append(runner)
        return instance

    async def stop(self) -> None:
        await self.loop_lag.stop()
        for instance in self.instances.values():
            await instance.stop()
        for runner in self._runners:
            await runner.cleanup()


async def start_fleet(configs: list[InstanceConfig]) -> RunningFleet:
    fleet = RunningFleet()
    try:
        for config in configs:
            await fleet.add(config)
        fleet.loop_lag.start()
    except BaseException:
        await fleet.stop()
        raise
    return fleet


async def serve_forever(configs: list[InstanceConfig], announce: Callable[[str], None] = print) -> None:
    fleet = await start_fleet(configs)
    for config in configs:
        announce(
            f"emulating {config.engine} '{config.model}' ({config.profile.name}) as {config.name} "
            f"on http://{config.host}:{config.port} (speedup {config.speedup:g})"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fleet.stop()
