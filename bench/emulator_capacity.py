"""Capacity benchmark: one emulator process hosting 8 instances under 4x the Azure conv trace.

Replays the trace's arrivals open-loop at ``--rate-scale`` times its rate, in real time
(speedup 1), each request with the trace's prompt size and exact reply length, streamed.
The emulator measures its own event-loop lag; the target is p99 <= 5 ms.

    .venv/bin/python bench/emulator_capacity.py [--duration 120] [--rate-scale 4]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import string
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from sloproxy.processes import EmulatorProcess

CONTEXT_TOKENS = 8192
MAX_PROMPT_TOKENS = 7000
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_conv_2023.csv"
FLEET = [
    *({"name": f"vllm-{i}", "engine": "vllm", "model": "llama-3-8b", "profile": "h100-llama3-8b"} for i in range(3)),
    *(
        {"name": f"sglang-{i}", "engine": "sglang", "model": "llama-3-8b", "profile": "h100-llama3-8b"}
        for i in range(3)
    ),
    *(
        {
            "name": f"tgi-{i}",
            "engine": "tgi",
            "model": "llama-3-8b",
            "profile": "a100-80g-llama3-8b",
            "max_concurrent_requests": 512,
        }
        for i in range(2)
    ),
]


def load_trace(path: Path, rate_scale: float, duration: float) -> list[tuple[float, int, int]]:
    """(arrival seconds from start, prompt tokens, reply tokens) within the replay window."""
    rows = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        start = None
        for row in reader:
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            start = start or stamp
            at = (stamp - start).total_seconds() / rate_scale
            if at > duration:
                break
            rows.append((at, int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))))
    return rows


def prompt_of(tokens: int, rng: random.Random) -> str:
    """A prompt of exactly ``tokens`` tokens under the emulator's rule (one short word per token)."""
    letters = string.ascii_lowercase
    return "".join(" " + "".join(rng.choices(letters, k=rng.randint(2, 6))) for _ in range(tokens))


async def one_request(session, url: str, engine: str, prompt: str, reply: int) -> tuple[bool, float, str]:
    started = time.perf_counter()
    if engine == "tgi":
        route, body = "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": reply}}
    else:
        route = "/v1/completions"
        body = {"model": "llama-3-8b", "prompt": prompt, "max_tokens": reply, "ignore_eos": True, "stream": True}
    ttft = None
    frames = 0
    async with session.post(url + route, json=body) as response:
        if response.status != 200:
            return False, 0.0, f"HTTP {response.status}: {(await response.read())[:200]!r}"
        async for line in response.content:
            if line.startswith(b"data:") and b"[DONE]" not in line:
                frames += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    return frames >= 1, ttft or 0.0, "" if frames else "empty stream"


async def replay(fleet: EmulatorProcess, rows, seed: int) -> dict:
    rng = random.Random(seed)
    names = [i["name"] for i in FLEET]
    engines = {i["name"]: i["engine"] for i in FLEET}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    results: list[tuple[bool, float, str]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.get(fleet.url(names[0]) + "/_emulator/loop_lag?reset=1") as response:
            await response.read()
        start = time.perf_counter()
        tasks = []
        for index, (at, prompt_tokens, reply_tokens) in enumerate(rows):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            name = names[index % len(names)]
            # Keep prompt + reply inside the 8192-token context of the Llama-3-8B profiles.
            prompt_tokens = min(prompt_tokens, MAX_PROMPT_TOKENS)
            reply_tokens = min(reply_tokens, CONTEXT_TOKENS - prompt_tokens - 1)
            prompt = prompt_of(prompt_tokens, rng)
            tasks.append(
                asyncio.ensure_future(one_request(session, fleet.url(name), engines[name], prompt, reply_tokens))
            )
        sent_span = time.perf_counter() - start
        results = await asyncio.gather(*tasks, return_exceptions=False)
        total_span = time.perf_counter() - start
        async with session.get(fleet.url(names[0]) + "/_emulator/loop_lag") as response:
            lag = await response.json()
    ok = [r for r in results if r[0]]
    failures = sorted({r[2] for r in results if not r[0]})
    ttfts = sorted(r[1] for r in ok)
    return {
        "requests": len(rows),
        "completed": len(ok),
        "failed": len(rows) - len(ok),
        "failure_kinds": failures[:5],
        "offered_rps": len(rows) / sent_span if sent_span else 0.0,
        "wall_s": total_span,
        "client_ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "client_ttft_p99_s": ttfts[int(len(ttfts) * 0.99) - 1] if ttfts else None,
        "loop_lag": lag,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="replay window, real seconds")
    parser.add_argument("--rate-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    rows = load_trace(args.trace, args.rate_scale, args.duration)
    with EmulatorProcess(FLEET, speedup=1.0) as fleet:
        cpu_before = cpu_seconds(fleet.process.pid)
        report = asyncio.run(replay(fleet, rows, args.seed))
        report["emulator_cpu_share"] = (cpu_seconds(fleet.process.pid) - cpu_before) / report["wall_s"]
    report.update(instances=len(FLEET), rate_scale=args.rate_scale, target_p99_lag_ms=5.0)
    report["meets_target"] = report["failed"] == 0 and report["loop_lag"]["p99_ms"] <= 5.0
    print(json.dumps(report, indent=2))
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
