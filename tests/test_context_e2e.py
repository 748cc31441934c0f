"""A mixed fleet with unlike context windows behind the proxy, driven by the official openai client:
windows learned from the engines, long prompts placed where they fit, reply limits clamped where an
engine would refuse (and said so), a 400 ``context_length_exceeded`` for what fits nowhere, and
``models.retrieve``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import get

WORD = " abcdef"  # one emulator token


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [
        {
            "name": "tgi-small",
            "engine": "tgi",
            "model": "llama",
            "profile": "a100-80g-llama3-8b",
            "max_model_len": 2048,
        },
        {"name": "sglang-small", "engine": "sglang", "model": "llama", "max_model_len": 2048},
        {"name": "vllm-big", "engine": "vllm", "model": "llama", "max_model_len": 8192},
        {"name": "sglang-only", "engine": "sglang", "model": "qwen", "max_model_len": 2048},
    ]
    with EmulatorProcess(instances, speedup=50.0) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(fleet: EmulatorProcess) -> Iterator[ProxyProcess]:
    backends = [
        {"name": name, "engine": name.split("-")[0], "url": fleet.url(name), "models": [model]}
        for name, model in (
            ("tgi-small", "llama"),
            ("sglang-small", "llama"),
            ("vllm-big", "llama"),
            ("sglang-only", "qwen"),
        )
    ]
    config = {"backends": backends, "policy": {"name": "least-load"}, "health": {"interval_s": 0.2, "timeout_s": 0.5}}
    with ProxyProcess(config) as running:
        yield running


def client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


async def test_windows_are_learned_from_the_engines(proxy: ProxyProcess) -> None:
    status, body, _ = await get(proxy.url + "/admin/fleet")
    assert status == 200
    windows = {b["name"]: b["context_window"] for b in json.loads(body)["backends"]}
    assert windows == {"tgi-small": 2048, "sglang-small": 2048, "vllm-big": 8192, "sglang-only": 2048}
    card = client(proxy).models.retrieve("llama")
    assert card.id == "llama" and card.object == "model"
    assert card.model_extra["max_model_len"] == 8192  # the largest window serving it
    with pytest.raises(openai.NotFoundError) as caught:
        client(proxy).models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"
    listed = {m.id: m.model_extra["max_model_len"] for m in client(proxy).models.list()}
    assert listed == {"llama": 8192, "qwen": 2048}


def test_long_prompts_go_where_they_fit(proxy: ProxyProcess) -> None:
    """Ten prompts of ~3,000 tokens: only the 8,192-token vLLM holds them; none is refused."""
    for _ in range(10):
        reply = client(proxy).chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": WORD * 3000}], max_tokens=8
        )
        completion = reply.parse()
        assert completion.usage.prompt_tokens > 2048
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert reply.headers.get("x-sloproxy-max-tokens-clamped") is None


def test_a_reply_limit_over_the_only_window_is_clamped_and_said(proxy: ProxyProcess) -> None:
    """SGLang refuses prompt + max_tokens over its window: the proxy sends the largest limit that fits."""
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="qwen",
        messages=[{"role": "user", "content": WORD * 1000}],
        max_tokens=4000,
        extra_body={"ignore_eos": True},
    )
    clamped = int(raw.headers["x-sloproxy-max-tokens-clamped"])
    completion = raw.parse()
    assert 0 < clamped < 2048 - 1000
    assert completion.usage.completion_tokens == clamped and completion.choices[0].finish_reason == "length"
    stream = client(proxy).chat.completions.with_raw_response.create(
        model="qwen", messages=[{"role": "user", "content": WORD * 1000}], max_tokens=4000, stream=True
    )
    assert int(stream.headers["x-sloproxy-max-tokens-clamped"]) == clamped
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream.parse())


def test_what_fits_nowhere_is_a_400_before_it_queues(proxy: ProxyProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(proxy).chat.completions.create(model="llama", messages=[{"role": "user", "content": WORD * 40000}])
    error = caught.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "8192" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client(proxy).completions.create(model="qwen", prompt=WORD * 5000, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded" and "2048" in caught.value.body["message"]
