"""A backend killed mid-run: streams in flight end with an OpenAI error frame, new requests retry."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import get, metric_samples, post_json, sse_events

INSTANCE = {"engine": "vllm", "model": "dup", "profile": "a100-80g-llama3-8b"}


async def test_backend_killed_mid_stream_then_retried():
    with (
        EmulatorProcess([{**INSTANCE, "name": "a"}], speedup=10) as fleet_a,
        EmulatorProcess([{**INSTANCE, "name": "b"}], speedup=10) as fleet_b,
    ):
        config = {
            "backends": [
                {"name": "a", "engine": "vllm", "url": fleet_a.url("a"), "models": ["dup"]},
                {"name": "b", "engine": "vllm", "url": fleet_b.url("b"), "models": ["dup"]},
            ],
            "health": {"interval_s": 30},  # slow on purpose: the proxy learns of the death by retrying
        }
        with ProxyProcess(config) as proxy:
            body = {
                "model": "dup",
                "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 2000,
                "ignore_eos": True,
                "stream": True,
            }
            async with aiohttp.ClientSession() as session:
                streams = [await session.post(proxy.url + "/v1/chat/completions", json=body) for _ in range(2)]
                firsts = []
                for response in streams:
                    assert response.status == 200
                    firsts.append(await response.content.readline())
                fleet_a.kill()  # one of the two streams is on a
                raws = [first + await response.read() for first, response in zip(firsts, streams, strict=True)]
            outcomes = []
            for raw in raws:
                events = sse_events(raw)
                assert events[-1] == b"[DONE]"
                last = json.loads(events[-2])
                outcomes.append("error" if "error" in last else last["choices"][0]["finish_reason"])
            assert sorted(outcomes) == ["error", "length"]
            error = next(json.loads(e) for raw in raws for e in sse_events(raw)[:-1] if b'"error"' in e)
            assert error["error"]["type"] == "server_error"

            # New requests: those routed to the dead backend are retried on b before their first byte.
            results = await asyncio.gather(
                *(
                    post_json(proxy.url + "/v1/completions", {"model": "dup", "prompt": "x", "max_tokens": 3})
                    for _ in range(6)
                )
            )
            assert [status for status, _, _ in results] == [200] * 6
            _, raw, _ = await get(proxy.url + "/metrics")
            retries = metric_samples(raw.decode()).get("sloproxy_upstream_retries_total", [])
            assert sum(v for labels, v in retries if labels["backend"] == "a") >= 1


async def test_all_backends_down_is_a_clean_error():
    with EmulatorProcess([{**INSTANCE, "name": "a"}], speedup=10) as fleet:
        config = {
            "backends": [{"name": "a", "engine": "vllm", "url": fleet.url("a"), "models": ["dup"]}],
            "health": {"interval_s": 30},
        }
        with ProxyProcess(config) as proxy:
            fleet.kill()
            status, body, _ = await post_json(
                proxy.url + "/v1/chat/completions", {"model": "dup", "messages": [{"role": "user", "content": "x"}]}
            )
            assert status == 502
            assert body["error"]["type"] == "server_error" and "unreachable" in body["error"]["message"]
