"""Built-ins register through the entry-point groups; adapters read load from real emulator metrics."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points

import pytest

from sloproxy.adapters.base import EngineAdapter
from sloproxy.policies.round_robin import RoundRobin
from tests.conftest import LONG_PROMPT
from tests.helpers import get, post_json


def test_entry_point_groups_hold_the_builtins():
    policies = {e.name: e.load() for e in entry_points(group="sloproxy.policies")}
    adapters = {e.name: e.load() for e in entry_points(group="sloproxy.adapters")}
    assert policies["round-robin"] is RoundRobin
    assert set(adapters) >= {"vllm", "tgi", "sglang"}
    assert all(issubclass(cls, EngineAdapter) and cls.engine == name for name, cls in adapters.items())


def test_round_robin_rotates_and_refuses_empty():
    router = RoundRobin()
    assert [router.choose(["a", "b", "c"]) for _ in range(5)] == ["a", "b", "c", "a", "b"]
    with pytest.raises(ValueError):
        router.choose([])


@pytest.mark.parametrize("engine", ["vllm", "tgi", "sglang"])
async def test_adapters_read_load_while_busy(fleet, engine):
    adapter = {e.name: e.load() for e in entry_points(group="sloproxy.adapters")}[engine]()
    url = fleet.url(engine)
    if engine == "tgi":
        request = (url + "/generate", {"inputs": LONG_PROMPT, "parameters": {"max_new_tokens": 2000}})
    else:
        model = "qwen-7b" if engine == "sglang" else "llama-3-8b"
        request = (url + "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 3000, "ignore_eos": True})
    jobs = [asyncio.ensure_future(post_json(*request)) for _ in range(3)]
    await asyncio.sleep(0.3)
    _, raw, _ = await get(url + "/metrics")
    load = adapter.parse_load(raw.decode())
    assert load.running == 3
    assert load.waiting == 0
    assert load.kv_usage is not None and 0 < load.kv_usage < 1
    assert load.kv_capacity_tokens and load.kv_capacity_tokens > 10_000
    await asyncio.gather(*jobs)
    _, raw, _ = await get(url + "/metrics")
    assert adapter.parse_load(raw.decode()).running == 0
