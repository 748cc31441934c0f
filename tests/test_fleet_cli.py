"""Fleet files are validated strictly; ``sloproxy emulate`` runs one instance or a whole fleet."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from sloproxy.cli import main
from sloproxy.emulator.fleet import load_fleet
from sloproxy.processes import free_port


def test_minimal_fleet_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "instances:\n"
        "  - {name: v1, engine: vllm, model: llama-3-8b, profile: a100-80g-llama3-8b, port: 9001}\n"
        "  - {name: t1, engine: tgi, model: llama-3-8b, profile: a10-llama2-7b, port: 9002}\n"
    )
    fleet = load_fleet(path)
    assert [i.name for i in fleet.instances] == ["v1", "t1"]
    assert fleet.speedup == 1.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{name: a, engine: vllm, model: m, port: 1, colour: red}", "colour"),
        ("{name: a, engine: triton, model: m, port: 1}", "engine"),
        ("{name: a, engine: vllm, model: m, port: high}", "port"),
        ("{name: a, model: m, port: 1}", "engine"),
    ],
)
def test_bad_fleet_files_name_the_field(tmp_path, line, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"instances:\n  - {line}\n")
    with pytest.raises(ValueError, match=message):
        load_fleet(path)


def test_a_fleet_without_ports_loads_for_the_simulator(tmp_path):
    """Ports mean nothing to simulate and sweep; emulate refuses such an instance (tests/test_sweep.py)."""
    path = tmp_path / "fleet.yaml"
    path.write_text("instances:\n  - {name: a, engine: vllm, model: m}\n  - {name: b, engine: tgi, model: m}\n")
    assert [i.port for i in load_fleet(path).instances] == [None, None]


def test_duplicate_ports_and_unknown_profile(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "instances:\n  - {name: a, engine: vllm, model: m, port: 5}\n  - {name: b, engine: tgi, model: m, port: 5}\n"
    )
    with pytest.raises(ValueError, match="ports must be unique"):
        load_fleet(path)
    path.write_text("instances:\n  - {name: a, engine: vllm, model: m, port: 5, profile: tpu-v9}\n")
    assert main(["emulate", "--fleet", str(path)]) == 2
    assert "unknown profile 'tpu-v9'" in capsys.readouterr().err


def test_single_instance_command_line():
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sloproxy.cli",
            "emulate",
            "--engine",
            "sglang",
            "--model",
            "qwen-7b",
            "--port",
            str(port),
            "--speedup",
            "10",
            "--max-model-len",
            "2048",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_server_info", timeout=1) as response:
                    info = response.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "emulator did not start"
                time.sleep(0.1)
        assert b'"context_length":2048' in info
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert f"emulating sglang 'qwen-7b' (h100-llama3-8b) as sglang-{port}" in output
