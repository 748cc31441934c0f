"""``make demo``: an emulated fleet (vLLM, TGI, SGLang; two models) under real OpenAI-client traffic.

Until the proxy lands this shows the fleet itself: every engine kind answering the official
``openai`` client over real HTTP, streaming and not, with latencies reported in emulated
seconds and each engine's own ``/metrics`` read back.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from .cli import run_async
from .emulator.fleet import InstanceSpec
from .processes import EmulatorProcess, free_port

DEMO_FLEET = (
    ("vllm-a100", "vllm", "llama-3-8b", "a100-80g-llama3-8b"),
    ("tgi-a10", "tgi", "llama-3-8b", "a10-llama2-7b"),
    ("sglang-h100", "sglang", "qwen-7b", "h100-llama3-8b"),
)
QUESTIONS = (
    "Explain continuous batching in two sentences.",
    "Write a haiku about GPUs.",
    "List three uses of a KV cache.",
    "What is a service level objective?",
    "Summarise the plot of Hamlet.",
    "Why do long prompts raise time to first token?",
)
LOAD_GAUGES = {
    "vllm": ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens"),
    "tgi": ("tgi_batch_current_size", "tgi_request_success", "tgi_queue_size"),
    "sglang": ("sglang:num_running_reqs", "sglang:token_usage", "sglang:generation_tokens"),
}


@dataclass
class Outcome:
    instance: str
    kind: str
    stream: bool
    ttft_s: float
    e2e_s: float
    tokens: int
    finish: str


async def _one(client, name: str, kind: str, model: str, stream: bool, speedup: float, rng: random.Random) -> Outcome:
    question = rng.choice(QUESTIONS)
    started = time.perf_counter()
    ttft = None
    if kind == "chat":
        kwargs = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 96}
        if stream:
            tokens, finish = 0, ""
            async for chunk in await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs
            ):
                if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                    ttft = time.perf_counter() - started
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        else:
            reply = await client.chat.completions.create(**kwargs)
            tokens, finish = reply.usage.completion_tokens, reply.choices[0].finish_reason
    else:
        reply = await client.completions.create(model=model, prompt=question, max_tokens=96)
        tokens, finish = reply.usage.completion_tokens, reply.choices[0].finish_reason
    e2e = time.perf_counter() - started
    # Wall-clock seconds x speedup = the emulated seconds a real GPU would have taken.
    return Outcome(name, kind, stream, (ttft or e2e) * speedup, e2e * speedup, tokens, finish)


async def _scrape(session: aiohttp.ClientSession, url: str, names: tuple[str, ...]) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in names or family.name.removesuffix("_total") in names:
            values[family.name] = sum(sample.value for sample in family.samples if not sample.name.endswith("_created"))
    return values


async def _run(speedup: float, requests: int) -> int:
    try:
        import openai  # noqa: F401 - checked here so the message comes before the fleet starts
    except ImportError:
        print("the demo uses the official openai client: pip install 'sloproxy[test]'")
        return 1
    specs = [
        InstanceSpec(name=name, engine=engine, model=model, profile=profile, port=free_port())
        for name, engine, model, profile in DEMO_FLEET
    ]
    with EmulatorProcess([msgspec.structs.asdict(s) for s in specs], speedup=speedup):
        print(f"started {len(specs)} emulated engines (speedup {speedup:g}: latencies below are emulated seconds)")
        for spec in specs:
            print(f"  {spec.name:12} {spec.engine:7} model={spec.model:11} profile={spec.profile:20} port={spec.port}")
        return await _traffic(specs, speedup, requests)


async def _traffic(specs: list[InstanceSpec], speedup: float, requests: int) -> int:
    from openai import AsyncOpenAI

    rng = random.Random(7)
    clients = {s.name: AsyncOpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="demo") for s in specs}
    jobs = []
    for index in range(requests):
        spec = specs[index % len(specs)]
        kind = "completion" if index % 4 == 3 else "chat"
        stream = kind == "chat" and index % 2 == 0
        jobs.append(_one(clients[spec.name], spec.name, kind, spec.model, stream, speedup, rng))
    outcomes = await asyncio.gather(*jobs)
    print(f"\n{'instance':12} {'kind':10} {'stream':6} {'TTFT s':>7} {'E2E s':>7} {'tokens':>6}  finish")
    for o in outcomes:
        print(
            f"{o.instance:12} {o.kind:10} {'yes' if o.stream else 'no':6} {o.ttft_s:7.3f} {o.e2e_s:7.3f} "
            f"{o.tokens:6d}  {o.finish}"
        )
    print(
        f"\n{len(outcomes)} requests, all answered; median E2E "
        f"{statistics.median(o.e2e_s for o in outcomes):.3f} s (emulated)"
    )
    async with aiohttp.ClientSession() as session:
        for spec in specs:
            values = await _scrape(session, f"http://127.0.0.1:{spec.port}", LOAD_GAUGES[spec.engine])
            shown = ", ".join(f"{k}={v:g}" for k, v in sorted(values.items()))
            print(f"  /metrics {spec.name:12} {shown}")
    for client in clients.values():
        await client.close()
    return 0


def main(speedup: float = 4.0, requests: int = 24) -> int:
    return run_async(_run(speedup, requests))
