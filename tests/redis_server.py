"""A private redis-server for tests: its own free port, no persistence, killable and restartable.

The tests of shared state run against a real Redis (no mocks): what they check is what the Lua
scripts do. A missing ``redis-server`` fails the tests rather than skipping them (CI installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from sloproxy.processes import free_port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server not found: the shared-state tests need a real Redis "
            "(apt-get install redis-server; .ci/run installs it)",
            pytrace=False,
        )
    return binary


class RedisServer:
    """``start`` / ``kill`` (SIGKILL: data lost, as a crash) / ``restart`` on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="sloproxy-redis-")
        self._log = str(Path(self._dir.name) / "redis.log")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", self._dir.name, "--logfile", self._log]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self._process.poll() is not None:
                log = Path(self._log).read_text() if Path(self._log).exists() else ""
                raise RuntimeError(f"redis-server exited on port {self.port}: {log.strip()[-500:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} in {timeout_s} s")
            time.sleep(0.01)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()
        self._dir.cleanup()


def running_redis() -> Iterator[RedisServer]:
    """The body of the ``redis_server`` fixture (tests/conftest.py)."""
    with RedisServer() as server:
        yield server
