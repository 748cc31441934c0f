"""Clean failures at start: ``serve``, ``emulate`` and ``replay`` name the cause in one line and exit 2
(a port in use, an unreadable config or lengths file, an unreachable Redis), never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sloproxy.processes import free_port


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sloproxy.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The error line; asserts exit 2, no traceback, and one line from sloproxy itself."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith(f"sloproxy {command}: ")]
    assert len(ours) == 1, result.stderr
    return ours[0]


@pytest.fixture
def busy_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def config(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        'backends: [{name: a, engine: vllm, url: "http://127.0.0.1:9", models: [m]}]\n' + extra
    )
    return path


def test_serve_on_a_port_in_use(tmp_path: Path, busy_port: int):
    line = one_line_error(run("serve", "--config", str(config(tmp_path, busy_port))), "serve")
    assert "already in use" in line and str(busy_port) in line


def test_serve_with_a_missing_or_unreadable_config(tmp_path: Path):
    assert "No such file" in one_line_error(run("serve", "--config", str(tmp_path / "nope.yaml")), "serve")
    assert "is a directory" in one_line_error(run("serve", "--config", str(tmp_path)), "serve")
    broken = tmp_path / "broken.yaml"
    broken.write_text("backends: [{name: a, engine: vllm, url: nowhere, models: [m]}]\n")
    assert "backends[0]`.url must start with http" in one_line_error(run("serve", "--config", str(broken)), "serve")


def test_serve_with_redis_unreachable(tmp_path: Path):
    dead = free_port()
    path = config(tmp_path, free_port(), f'state: {{backend: redis, url: "redis://127.0.0.1:{dead}/0"}}\n')
    line = one_line_error(run("serve", "--config", str(path)), "serve")
    assert "is unreachable at start" in line and f"127.0.0.1:{dead}/0" in line


def test_emulate_on_a_port_in_use_and_with_a_missing_lengths_file(tmp_path: Path, busy_port: int):
    line = one_line_error(run("emulate", "--engine", "vllm", "--model", "m", "--port", str(busy_port)), "emulate")
    assert "already in use" in line
    missing = tmp_path / "lengths.jsonl"
    line = one_line_error(
        run("emulate", "--engine", "vllm", "--model", "m", "--port", str(free_port()), "--lengths", str(missing)),
        "emulate",
    )
    assert str(missing) in line


def test_replay_with_a_missing_or_broken_workload(tmp_path: Path):
    target = f"http://127.0.0.1:{free_port()}"
    out = str(tmp_path / "run.jsonl")
    line = one_line_error(
        run("replay", "--workload", str(tmp_path / "w.jsonl"), "--target", target, "--out", out), "replay"
    )
    assert "No such file" in line
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "r1", "arr')
    line = one_line_error(run("replay", "--workload", str(broken), "--target", target, "--out", out), "replay")
    assert "broken.jsonl:1" in line
