"""Built-ins register through the entry-point groups; adapters read load from real emulator metrics."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points

import pytest

from sloproxy.adapters.base import EngineAdapter
from sloproxy.policies.base import PolicySpec, Snapshot
from sloproxy.policies.presets import ROUND_ROBIN
from tests.conftest import LONG_PROMPT
from tests.helpers import get, post_json


def test_entry_point_groups_hold_the_builtins():
    policies = {e.name: e.load() for e in entry_points(group="sloproxy.policies")}
    adapters = {e.name: e.load() for e in entry_points(group="sloproxy.adapters")}
    assert policies["round-robin"] is ROUND_ROBIN
    assert {"round-robin", "least-load", "fcfs", "edf", "priority-fair"} <= set(policies)
    assert all(isinstance(spec, PolicySpec) and spec.name == name for name, spec in policies.items())
    assert set(adapters) >= {"vllm", "tgi", "sglang"}
    assert all(issubclass(cls, EngineAdapter) and cls.engine == name for name, cls in adapters.items())


def test_round_robin_rotates_over_candidates():
    from types import SimpleNamespace

    policy = ROUND_ROBIN.create({})
    backends = [SimpleNamespace(name=n) for n in "abc"]
    picks = [policy.route(None, backends, Snapshot(0.0, backends)).name for _ in range(5)]
    assert picks == ["a", "b", "c", "a", "b"]
    assert policy.route(None, [], Snapshot(0.0, [])) is None
    with pytest.raises(ValueError, match="speed"):
        ROUND_ROBIN.create({"speed": 1})


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
