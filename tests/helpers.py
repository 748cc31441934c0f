"""Small HTTP helpers for tests: raw bytes in, parsed frames out (no client library smoothing)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
from prometheus_client.parser import text_string_to_metric_families


async def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        raw = await response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode()
        return response.status, parsed, dict(response.headers)


async def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read(), dict(response.headers)


async def stream_raw(url: str, body: Any) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.read()


def sse_events(raw: bytes, prefix: bytes = b"data: ") -> list[bytes]:
    """Split an SSE body into event payloads; asserts every event uses exactly ``prefix``."""
    events = [e for e in raw.split(b"\n\n") if e]
    payloads = []
    for event in events:
        assert event.startswith(prefix), f"event {event[:40]!r} does not start with {prefix!r}"
        rest = event[len(prefix) :]
        assert not rest.startswith(b" "), f"unexpected extra space in {event[:40]!r}"
        payloads.append(rest)
    return payloads


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse with prometheus_client's own text parser: sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def metric_types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


async def stream_to_end(base_url: str, model: str, max_tokens: int, messages: list[dict]) -> tuple[int, str | None]:
    """Stream one chat reply (``ignore_eos``: exactly ``max_tokens``) with the official openai client to its
    end; (content chunks, finish reason)."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60.0)
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True}
    )
    chunks, finish = 0, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return chunks, finish


def exact_chat(model: str, tokens: int | None = None, **extra: Any) -> dict:
    """A chat body whose rendered prompt is exactly ``tokens`` emulator tokens (a short one by default)."""
    from sloproxy.emulator.tokens import count_tokens, render_chat

    content = "Say something."
    if tokens is not None:
        base = count_tokens(render_chat([{"role": "user", "content": "x"}]))
        content = "x" + " x" * (tokens - base)
        assert count_tokens(render_chat([{"role": "user", "content": content}])) == tokens
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
