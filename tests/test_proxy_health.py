"""Health checks take a failing backend out of rotation and bring it back; OpenAI-type backends work."""

from __future__ import annotations

import asyncio
import json

from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import get, post_json


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_failing_backend_is_taken_out_and_brought_back():
    instances = [{"name": n, "engine": "vllm", "model": "m"} for n in ("a", "b")]
    with EmulatorProcess(instances, speedup=20) as fleet:
        backends = [{"name": n, "engine": "vllm", "url": fleet.url(n), "models": ["m"]} for n in ("a", "b")]
        config = {"backends": backends, "health": {"interval_s": 0.1, "unhealthy_after": 2, "healthy_after": 2}}
        with ProxyProcess(config) as proxy:

            async def healthy() -> list[str]:
                _, raw, _ = await get(proxy.url + "/ready")
                return json.loads(raw)["healthy_backends"]

            await post_json(fleet.url("a") + "/_emulator/health", {"healthy": False})
            await _wait_for(lambda: _is(healthy, ["b"]))
            before = await _served(fleet, "a")
            for _ in range(4):
                status, _, _ = await post_json(
                    proxy.url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2}
                )
                assert status == 200
            assert await _served(fleet, "a") == before  # nothing routed to the failing backend

            await post_json(fleet.url("b") + "/_emulator/health", {"healthy": False})
            await _wait_for(lambda: _is(healthy, []))
            status, _, _ = await get(proxy.url + "/ready")
            assert status == 503
            status, body, headers = await post_json(proxy.url + "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 503 and body["error"]["type"] == "service_unavailable_error"
            assert headers.get("Retry-After") == "1"

            for name in ("a", "b"):
                await post_json(fleet.url(name) + "/_emulator/health", {"healthy": True})
            await _wait_for(lambda: _is(healthy, ["a", "b"]))


async def _is(probe, expected) -> bool:
    return sorted(await probe()) == expected


async def _served(fleet: EmulatorProcess, name: str) -> int:
    _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
    return sum(json.loads(raw)["finished"].values())


async def test_openai_compatible_backend():
    with EmulatorProcess([{"name": "o", "engine": "vllm", "model": "gpt-x"}], speedup=20) as fleet:
        config = {
            "backends": [
                {
                    "name": "o",
                    "engine": "openai",
                    "url": fleet.url("o"),
                    "models": ["gpt-x"],
                    "api_key": "sk-test",
                    "max_context_tokens": 8192,
                }
            ]
        }
        with ProxyProcess(config) as proxy:
            status, body, _ = await post_json(
                proxy.url + "/v1/chat/completions",
                {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            )
            assert status == 200 and body["usage"]["completion_tokens"] <= 3
            _, raw, _ = await get(proxy.url + "/ready")
            assert json.loads(raw)["healthy_backends"] == ["o"]  # health through /v1/models
