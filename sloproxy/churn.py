"""Churn: mixed client traffic with disconnects while faults come and go on an emulated backend.

Shared by ``bench/churn.py`` (minutes of it, sampling the proxy process's memory and descriptors)
and ``tests/test_churn.py`` (seconds of it, in the suite). Every request ends in exactly one
outcome, and the invariant is that none is ``lost``:

* ``ok``: a complete reply (a finish reason; a stream ended by ``[DONE]``);
* ``http_<status>``: an explicit OpenAI-format error reply (``proxy_500``: one from the proxy's own
  code, which counts as a bug);
* ``stream_error``: an OpenAI error frame then ``[DONE]`` after content had begun;
* ``disconnected``: the client itself hung up mid-stream (on purpose);
* ``lost``: anything else: no answer within the client's timeout, a connection the proxy dropped
  without an error, a stream cut without an error frame, a body that is not what it claims.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

FAULTS = ("hang", "garbage", "reset", "kill_mid_stream", "slow_first_byte", "flap_health")


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome in ("lost", "proxy_500") and len(self.lost_examples) < 10:
            self.lost_examples.append(f"{outcome}: {detail}"[:300])

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def lost(self) -> int:
        return self.outcomes["lost"] + self.outcomes["proxy_500"]


def _body(stream: bool, max_tokens: int, model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"churn {random.random()}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _error_outcome(response: aiohttp.ClientResponse) -> tuple[str, str]:
    raw = await response.read()
    try:
        error = json.loads(raw)["error"]
        explicit = isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        explicit = False
    if not explicit:
        return "lost", f"HTTP {response.status} without an OpenAI error body: {raw[:100]!r}"
    if response.status == 500:
        return "proxy_500", raw.decode(errors="replace")
    return f"http_{response.status}", ""


def _stream_outcome(raw: bytes) -> tuple[str, str]:
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return "lost", f"stream without [DONE] ({len(raw)} bytes, ends {raw[-80:]!r})"
    finish = None
    for payload in events[:-1]:
        try:
            chunk = json.loads(payload)
        except ValueError:
            return "lost", f"stream event is not JSON: {payload[:80]!r}"
        if "error" in chunk:
            return "stream_error", ""
        for choice in chunk.get("choices") or ():
            finish = choice.get("finish_reason") or finish
    return ("ok", "") if finish else ("lost", "stream ended by [DONE] without a finish reason")


async def one_request(
    session: aiohttp.ClientSession, url: str, kind: str, model: str, timeout_s: float
) -> tuple[str, str]:
    """One client request of ``kind`` (plain, stream, disconnect) and its outcome."""
    stream = kind != "plain"
    max_tokens = random.randint(5, 60) if kind != "disconnect" else 400
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/chat/completions", json=_body(stream, max_tokens, model)) as response:
                if response.status != 200:
                    return await _error_outcome(response)
                if kind == "plain":
                    reply = await response.json(content_type=None)
                    if reply["choices"][0]["finish_reason"] is None:
                        return "lost", "a reply without a finish reason"
                    return "ok", ""
                if kind == "disconnect":
                    await response.content.readuntil(b"\n\n")  # the first event, then hang up
                    await asyncio.sleep(random.uniform(0.0, 0.05))
                    response.close()
                    return "disconnected", ""
                return _stream_outcome(await response.read())
    except TimeoutError:
        return "lost", f"{kind}: no complete answer within {timeout_s:g}s"
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, IndexError) as exc:
        return "lost", f"{kind}: {exc!r}"


async def client_worker(
    url: str,
    model: str,
    tally: Tally,
    stop: asyncio.Event,
    *,
    timeout_s: float = 90.0,
    weights: Sequence[int] = (5, 4, 1),
) -> None:
    """Requests back to back until ``stop``: plain, streamed and hung-up-on, in ``weights`` proportion."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            kind = random.choices(("plain", "stream", "disconnect"), weights)[0]
            outcome, detail = await one_request(session, url, kind, model, timeout_s)
            tally.add(outcome, detail)


async def set_fault(session: aiohttp.ClientSession, backend_url: str, mode: str, **params: float) -> None:
    async with session.post(backend_url + "/_emulator/fault", json={"mode": mode, **params}) as response:
        response.raise_for_status()


async def fault_toggler(
    backend_urls: Sequence[str],
    tally: Tally,
    stop: asyncio.Event,
    *,
    gap_s: tuple[float, float] = (3.0, 10.0),
    fault_s: tuple[float, float] = (2.0, 8.0),
    faults: Sequence[str] = FAULTS,
) -> None:
    """Now and then, one backend misbehaves for a while (a random one of ``faults``), then heals."""
    params = {
        "slow_first_byte": {"delay_s": 3.0},  # beyond bench/churn.py's first_byte_timeout_s (2 s)
        "kill_mid_stream": {"after_s": 0.02},  # while short replies still stream (~2 ms a token)
        "flap_health": {"period_s": 0.7},
    }
    async with aiohttp.ClientSession() as session:
        try:
            while not stop.is_set():
                with_gap = asyncio.ensure_future(stop.wait())
                await asyncio.wait([with_gap], timeout=random.uniform(*gap_s))
                with_gap.cancel()
                if stop.is_set():
                    break
                url, mode = random.choice(backend_urls), random.choice(faults)
                await set_fault(session, url, mode, **params.get(mode, {}))
                tally.faults[mode] += 1
                await asyncio.sleep(random.uniform(*fault_s))
                await set_fault(session, url, "none")
        finally:
            for url in backend_urls:
                await set_fault(session, url, "none")


async def churn(
    url: str,
    model: str,
    backend_urls: Sequence[str],
    seconds: float,
    *,
    clients: int = 12,
    tally: Tally | None = None,
    fault_gap_s: tuple[float, float] = (3.0, 10.0),
    fault_s: tuple[float, float] = (2.0, 8.0),
    faults: Sequence[str] = FAULTS,
) -> Tally:
    """Run ``clients`` workers against the proxy at ``url`` for ``seconds`` while faults toggle on
    ``backend_urls``; returns the tally once every worker's last request has ended."""
    tally = tally or Tally()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client_worker(url, model, tally, stop)) for _ in range(clients)]
    toggler = fault_toggler(backend_urls, tally, stop, gap_s=fault_gap_s, fault_s=fault_s, faults=faults)
    tasks.append(asyncio.create_task(toggler))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return tally
