"""Profile a live backend over HTTP: TTFT and time per output token vs concurrency and prompt size.

Each cell of the grid is a closed loop: ``concurrency`` clients each send a streamed chat completion,
wait for its end and send the next, for ``seconds`` (at least two requests per client). Every request
has a unique first word (no prefix-cache hits), a prompt of the cell's size and ``max_tokens`` with
``ignore_eos``, so reply lengths are fixed and cells compare like for like. Each client's first request
is left out: they all start together, a burst the steady state never sees.

Time scale: an emulated engine started with ``--speedup K`` runs K times faster than the hardware it
models. ``time_scale=K`` multiplies every measured duration by K (and divides throughputs by K), so the
profile is in the modelled hardware's seconds, as the replayer reports; against a real engine leave it 1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from ..emulator.tokens import OUTPUT_PIECES, count_tokens, render_chat
from ..evaluation.replay import chat_url
from ..sse import SSEDecoder
from .measure import Sample, finish_profile, summarize_cell, walk_grid
from .profile import INTERACTIVE, Cell, InstanceProfile, SloTarget

ENGINES = ("vllm", "tgi", "sglang", "openai")
_IGNORE_EOS = frozenset({"vllm", "sglang", "tgi"})  # a plain OpenAI server would reject the extra field
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def nonce_word(number: int) -> str:
    """A distinct word of at most six letters per number (one token), so no two prompts share a prefix."""
    letters = ""
    number += 26**3  # at least four letters: never a common word
    while number:
        number, digit = divmod(number, 26)
        letters = _LETTERS[digit] + letters
    return letters[-6:]


def prompt_text(prompt_tokens: int, number: int) -> str:
    """User text whose rendered chat prompt counts ``prompt_tokens`` under the emulator's tokeniser
    (close to cl100k on English: one token per short word)."""
    overhead = count_tokens(render_chat([{"role": "user", "content": "x"}])) - 1  # the template's own tokens
    words = max(prompt_tokens - overhead, 1)
    body = [nonce_word(number)]
    body += [OUTPUT_PIECES[i % len(OUTPUT_PIECES)].strip() for i in range(words - 1)]
    return " ".join(body)


@dataclass(slots=True)
class LiveSettings:
    """How to drive the backend."""

    target: str
    model: str
    engine: str = "vllm"
    output_tokens: int = 128
    seconds: float = 10.0  # per cell, wall clock
    time_scale: float = 1.0
    timeout_s: float = 300.0  # per request, wall clock
    api_key: str | None = None


class LiveProfiler:
    """Measures cells against one backend; one aiohttp session, no connection limit."""

    def __init__(self, settings: LiveSettings, session: aiohttp.ClientSession) -> None:
        if settings.engine not in ENGINES:
            raise ValueError(f"unknown engine {settings.engine!r} (known: {', '.join(ENGINES)})")
        if settings.time_scale <= 0 or settings.seconds <= 0 or settings.output_tokens < 2:
            raise ValueError("time scale and seconds must be positive, output tokens at least 2")
        self.settings = settings
        self.session = session
        self.url = chat_url(settings.target)
        self._numbers = iter(range(10**9))
        self.headers = {"content-type": "application/json"}
        if settings.api_key:
            self.headers["authorization"] = f"Bearer {settings.api_key}"

    def body(self, prompt_tokens: int) -> bytes:
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [{"role": "user", "content": prompt_text(prompt_tokens, next(self._numbers))}],
            "max_tokens": s.output_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if s.engine in _IGNORE_EOS:
            body["ignore_eos"] = True
        return msgspec.json.encode(body)

    async def one(self, prompt_tokens: int) -> Sample | None:
        """One streamed request; None when it failed (status, error frame, cut stream, timeout)."""
        scale = self.settings.time_scale
        start = time.perf_counter()
        first: float | None = None
        chunks, usage, done = 0, None, False
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                async with self.session.post(self.url, data=self.body(prompt_tokens), headers=self.headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        return None
                    decoder = SSEDecoder()
                    async for raw in resp.content.iter_any():
                        for payload in decoder.feed(raw):
                            if payload.strip() == b"[DONE]":
                                done = True
                                continue
                            event = msgspec.json.decode(payload)
                            if not isinstance(event, dict) or "error" in event:
                                return None
                            for choice in event.get("choices") or ():
                                if (choice.get("delta") or {}).get("content"):
                                    first = first or time.perf_counter()
                                    chunks += 1
                            usage = event.get("usage") or usage
        except (TimeoutError, aiohttp.ClientError, OSError, msgspec.DecodeError):
            return None
        end = time.perf_counter()
        if not done or first is None:
            return None
        usage = usage or {}
        return Sample(
            ttft_s=(first - start) * scale,
            e2e_s=(end - start) * scale,
            prompt_tokens=int(usage.get("prompt_tokens") or prompt_tokens),
            output_tokens=int(usage.get("completion_tokens") or chunks),
        )

    async def cell(self, concurrency: int, prompt_tokens: int) -> Cell:
        """A closed loop of ``concurrency`` clients for ``seconds``, at least two requests each."""
        deadline = time.perf_counter() + self.settings.seconds
        samples: list[Sample] = []
        errors = 0

        async def client() -> None:
            nonlocal errors
            rounds = 0
            while rounds < 2 or time.perf_counter() < deadline:
                sample = await self.one(prompt_tokens)
                rounds += 1
                if sample is None:
                    errors += 1
                    if errors > 4 * concurrency:
                        return  # the backend refuses this load: the cell fails, move on
                    await asyncio.sleep(0.05)
                elif rounds > 1:
                    samples.append(sample)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize_cell(concurrency, prompt_tokens, self.settings.output_tokens, samples, errors)


async def profile_live(
    settings: LiveSettings,
    concurrencies: list[int],
    prompt_sizes: list[int],
    *,
    slo: SloTarget = INTERACTIVE,
    gpu_type: str = "unknown",
    gpus_per_instance: int = 1,
    cost_per_gpu_hour: float = 1.0,
    deployment: str | None = None,
    full_grid: bool = False,
    progress: Callable[[Cell], None] | None = None,
) -> InstanceProfile:
    """Measure the grid against ``settings.target`` and return the profile (capacity derived for ``slo``)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        profiler = LiveProfiler(settings, session)
        cells = await walk_grid(profiler.cell, concurrencies, prompt_sizes, slo, full_grid=full_grid, progress=progress)
    profile = InstanceProfile(
        model=settings.model,
        engine=settings.engine,
        gpu_type=gpu_type,
        gpus_per_instance=gpus_per_instance,
        cost_per_gpu_hour=cost_per_gpu_hour,
        deployment=deployment,
        source="live",
        target=settings.target,
        time_scale=settings.time_scale,
        slo=slo,
    )
    return finish_profile(profile, cells)
