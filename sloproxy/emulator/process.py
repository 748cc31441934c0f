"""Run an emulated fleet in a child process (how tests, the demo and benchmarks use it).

A separate process keeps the emulator's event loop free of the client's work, as it would
be in front of real engines, so client-side timings x speedup match the emulated ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmulatorProcess:
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
        self.instances = [dict(i) for i in instances]
        for instance in self.instances:
            instance.setdefault("port", free_port())
        self.speedup = speedup
        self.startup_timeout = startup_timeout
        self.extra = extra or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="sloproxy-fleet-")
        self.log_path = Path(self._dir.name) / "emulator.log"

    def url(self, name: str) -> str:
        for instance in self.instances:
            if instance["name"] == name:
                return f"http://127.0.0.1:{instance['port']}"
        raise KeyError(name)

    def __enter__(self) -> EmulatorProcess:
        fleet_file = Path(self._dir.name) / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"speedup": self.speedup, "instances": self.instances, **self.extra}))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sloproxy.cli", "emulate", "--fleet", str(fleet_file)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.startup_timeout
        pending = {i["name"] for i in self.instances}
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"emulator exited early:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"emulator not ready after {self.startup_timeout}s")
            for name in list(pending):
                try:
                    with urllib.request.urlopen(self.url(name) + "/health", timeout=1) as response:
                        if response.status == 200:
                            pending.discard(name)
                except OSError:
                    pass
            if pending:
                time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL the whole fleet (fault-injection tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "_log"):
            self._log.close()
        self._dir.cleanup()
