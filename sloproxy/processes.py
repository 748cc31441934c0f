"""Emulated fleets and proxy replicas in child processes (how tests, the demo and benchmarks run them).

A separate process keeps each event loop free of the client's work, as it would be in a real
deployment, so client-side timings x speedup match the emulated ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import yaml

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free right now, never one this process handed out before: the OS may give two quick
    calls the same port (seen in CI: two emulated instances of one fleet got the same one)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class ChildProcess(ABC):
    """A ``sloproxy`` subcommand in a child process, ready once its health URLs answer 200."""

    def __init__(self, startup_timeout: float = 20.0) -> None:
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="sloproxy-")
        self.workdir = Path(self._dir.name)
        self.log_path = self.workdir / "output.log"

    @abstractmethod
    def command(self) -> list[str]:
        """Arguments after ``sloproxy``."""

    @abstractmethod
    def health_urls(self) -> list[str]:
        """URLs that answer 200 once the child is ready."""

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sloproxy.cli", *self.command()],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.startup_timeout
        pending = set(self.health_urls())
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited early:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.command()[0]} not ready after {self.startup_timeout}s")
            for url in list(pending):
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status == 200:
                            pending.discard(url)
                except OSError:
                    pass
            if pending:
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (fault-injection tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()


class EmulatorProcess(ChildProcess):
    """``with EmulatorProcess(instances, speedup=K) as fleet: fleet.url("v1")``.

    ``instances`` are fleet-file entries (dicts); a missing ``port`` gets a free one.
    """

    def __init__(
        self,
        instances: list[dict[str, Any]],
        *,
        speedup: float = 1.0,
        startup_timeout: float = 20.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(startup_timeout)
        self.instances = [dict(i) for i in instances]
        for instance in self.instances:
            instance.setdefault("port", free_port())
        self.speedup = speedup
        self.extra = extra or {}

    def url(self, name: str) -> str:
        for instance in self.instances:
            if instance["name"] == name:
                return f"http://127.0.0.1:{instance['port']}"
        raise KeyError(name)

    def command(self) -> list[str]:
        fleet_file = self.workdir / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"speedup": self.speedup, "instances": self.instances, **self.extra}))
        return ["emulate", "--fleet", str(fleet_file)]

    def health_urls(self) -> list[str]:
        return [self.url(i["name"]) + "/health" for i in self.instances]


class ProxyProcess(ChildProcess):
    """``with ProxyProcess(config_dict) as proxy: proxy.url`` — a proxy replica on a free port."""

    def __init__(self, config: dict[str, Any], startup_timeout: float = 20.0) -> None:
        super().__init__(startup_timeout)
        self.config = dict(config)
        # Always a free port: a config converted from ProxyConfig carries the default 8000, which
        # another process on the machine may hold (a test then talks to the wrong server).
        self.config["listen"] = {"host": "127.0.0.1", "port": free_port()}
        self.url = f"http://127.0.0.1:{self.config['listen']['port']}"

    def command(self) -> list[str]:
        config_file = self.workdir / "proxy.yaml"
        config_file.write_text(yaml.safe_dump(self.config))
        return ["serve", "--config", str(config_file)]

    def health_urls(self) -> list[str]:
        return [self.url + "/health"]
