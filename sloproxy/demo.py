"""``make demo``: sloproxy in front of an emulated fleet (vLLM, TGI, SGLang; two models).

Starts the fleet and one proxy replica (embedded state, nothing else to install), sends real
traffic through the official ``openai`` client to the proxy, streaming and not, and prints
what happened: per-request latencies (emulated seconds), which backend served what, and the
proxy's own metrics. Then it replays a few minutes of a real trace (Azure conversations) through
the proxy once per policy and prints the SLO report side by side (see ``demo_replay.py``).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from .cli import run_async
from .demo_replay import find_data_dir, replay_policies
from .emulator.fleet import InstanceSpec
from .processes import EmulatorProcess, ProxyProcess, free_port

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


@dataclass
class Outcome:
    model: str
    kind: str
    stream: bool
    ttft_s: float
    e2e_s: float
    tokens: int
    finish: str


async def _one(client, model: str, kind: str, stream: bool, speedup: float, rng: random.Random) -> Outcome:
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
    return Outcome(model, kind, stream, (ttft or e2e) * speedup, e2e * speedup, tokens, finish)


async def _run(speedup: float, requests: int, replay: ReplaySettings) -> int:
    try:
        import openai  # noqa: F401 - checked here so the message comes before the fleet starts
    except ImportError:
        print("the demo uses the official openai client: pip install 'sloproxy[test]'")
        return 1
    specs = [
        InstanceSpec(name=name, engine=engine, model=model, profile=profile, port=free_port())
        for name, engine, model, profile in DEMO_FLEET
    ]
    with EmulatorProcess([msgspec.structs.asdict(s) for s in specs], speedup=speedup) as fleet:
        print(f"started {len(specs)} emulated engines (speedup {speedup:g}: latencies below are emulated seconds)")
        for spec in specs:
            print(f"  {spec.name:12} {spec.engine:7} model={spec.model:11} profile={spec.profile:20} port={spec.port}")
        backends = [{"name": s.name, "engine": s.engine, "url": fleet.url(s.name), "models": [s.model]} for s in specs]
        with ProxyProcess({"backends": backends, "policy": {"name": "round-robin"}}) as proxy:
            print(f"sloproxy serving on {proxy.url} (policy round-robin, embedded state)")
            status = await _traffic(proxy.url, specs, speedup, requests)
    if status != 0 or replay.seconds <= 0:
        return status
    data = find_data_dir()
    if data is None:
        print("\n(trace replay skipped: the shared traces were not found; set SLOPROXY_DATA to their directory)")
        return status
    await replay_policies(
        specs, data, replay.out_dir, policies=replay.policies, seconds=replay.seconds, speedup=replay.speedup
    )
    return status


@dataclass(frozen=True)
class ReplaySettings:
    seconds: float = 120.0  # of the Azure conversation trace; 0: skip the replay
    speedup: float = 10.0
    policies: tuple[str, ...] = ("round-robin", "least-load", "slo")
    out_dir: Path = Path("build/demo")


async def _traffic(proxy_url: str, specs: list[InstanceSpec], speedup: float, requests: int) -> int:
    from openai import AsyncOpenAI

    rng = random.Random(7)
    client = AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="demo", max_retries=0)
    models = sorted({s.model for s in specs})
    jobs = []
    for index in range(requests):
        model = models[index % len(models)]
        kind = "completion" if index % 4 == 3 else "chat"
        stream = kind == "chat" and index % 2 == 0
        jobs.append(_one(client, model, kind, stream, speedup, rng))
    outcomes = await asyncio.gather(*jobs)
    await client.close()
    print(f"\n{'model':11} {'kind':10} {'stream':6} {'TTFT s':>7} {'E2E s':>7} {'tokens':>6}  finish")
    for o in outcomes:
        print(
            f"{o.model:11} {o.kind:10} {'yes' if o.stream else 'no':6} {o.ttft_s:7.3f} {o.e2e_s:7.3f} "
            f"{o.tokens:6d}  {o.finish}"
        )
    print(
        f"\n{len(outcomes)} requests through the proxy, all answered; median E2E "
        f"{statistics.median(o.e2e_s for o in outcomes):.3f} s (emulated)"
    )
    async with aiohttp.ClientSession() as session, session.get(f"{proxy_url}/metrics") as response:
        text = await response.text()
    served: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "sloproxy_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['model']} {sample.labels['outcome']}"
                    served[key] = served.get(key, 0) + sample.value
    print("proxy /metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(served.items())))
    async with aiohttp.ClientSession() as session:
        for spec in specs:
            async with session.get(f"http://127.0.0.1:{spec.port}/_emulator/state") as response:
                state = await response.json()
            print(
                f"  engine {spec.name:12} served {sum(state['finished'].values()):3d} requests, "
                f"{state['generation_tokens']} tokens generated"
            )
    return 0


def main(speedup: float = 4.0, requests: int = 24, replay: ReplaySettings | None = None) -> int:
    return run_async(_run(speedup, requests, replay or ReplaySettings()))
