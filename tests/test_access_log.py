"""The opt-in access log (one JSON line per request, never a key or a prompt) and the log line for a
backend that fails mid-stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from sloproxy.auth import hash_key
from sloproxy.processes import EmulatorProcess
from tests.test_faults import MODEL, ask_many, config_for, fault, running_proxy

KEY = "sk-tenant-secret-0123456789"
PROMPT = "a prompt that must never reach a log"


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [{"name": name, "engine": "vllm", "model": MODEL} for name in ("good", "bad")]
    with EmulatorProcess(instances, speedup=20.0) as running:
        yield running


async def test_one_line_per_request_without_keys_or_prompts(fleet: EmulatorProcess, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    config = {
        **config_for(fleet),
        "access_log": {"enabled": True, "path": str(path)},
        "tenants": [{"name": "acme", "api_keys": [hash_key(KEY)]}],
    }
    async with running_proxy(config) as (_, client):
        keyed = client.with_options(api_key=KEY)
        await keyed.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
        stream = await keyed.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=5, stream=True
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await keyed.chat.completions.create(model="nope", messages=[{"role": "user", "content": PROMPT}])
        with pytest.raises(openai.AuthenticationError):
            await client.with_options(api_key="sk-wrong-key").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}]
            )
    text = path.read_text()
    assert KEY not in text and "sk-wrong-key" not in text and PROMPT not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["status"] for line in lines] == [200, 200, 404, 401]
    ok, streamed, unknown, unauthorised = lines
    assert ok["tenant"] == "acme" and ok["model"] == MODEL and ok["backend"] in ("good", "bad")
    assert ok["outcome"] == "ok" and ok["slo_class"] and ok["completion_tokens"] == 5 and ok["prompt_tokens"] > 0
    assert ok["e2e_s"] > 0 and ok["ttft_s"] is None  # non-streamed: no first token of its own
    assert streamed["stream"] is True and 0 < streamed["ttft_s"] <= streamed["e2e_s"]
    assert unknown["error_code"] == "model_not_found" and unknown["backend"] is None
    assert unauthorised["id"] is None and unauthorised["outcome"] == "http_401"


async def test_a_mid_stream_failure_is_logged(fleet: EmulatorProcess, caplog: pytest.LogCaptureFixture) -> None:
    await fault(fleet, "bad", "kill_mid_stream", after_s=0.15)
    try:
        with caplog.at_level(logging.WARNING, logger="sloproxy.forward"):
            async with running_proxy(config_for(fleet)) as (_, client):
                outcomes = await ask_many(client, 4, stream=True, max_tokens=2000)
        assert outcomes["stream_error"] == 2
        failed = [r.getMessage() for r in caplog.records if "mid-stream" in r.getMessage()]
        assert len(failed) == 2 and all("backend bad failed mid-stream" in m for m in failed), failed
    finally:
        await fault(fleet, "bad", "none")
