"""A policy plugin package (tests/plugin_example) is installed and the proxy loads it by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import post_json

PLUGIN = Path(__file__).parent / "plugin_example"


async def test_installed_plugin_is_loaded_by_name(tmp_path, monkeypatch):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(PLUGIN)],
        check=True,
    )
    monkeypatch.setenv("PYTHONPATH", str(target))
    listed = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sloproxy.plugins import load_policy; p = load_policy('shortest-first', {'kv_limit': 0.9});"
            "print(p.name, p.admission.kv_limit)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listed.split() == ["shortest-first", "0.9"]
    with EmulatorProcess([{"name": "v", "engine": "vllm", "model": "m"}], speedup=20) as fleet:
        config = {
            "backends": [{"name": "v", "engine": "vllm", "url": fleet.url("v"), "models": ["m"]}],
            "policy": {"name": "shortest-first"},
        }
        with ProxyProcess(config) as proxy:
            status, body, _ = await post_json(
                proxy.url + "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3}
            )
            assert status == 200 and body["usage"]["completion_tokens"] <= 3
            assert "policy shortest-first" in proxy.output()
