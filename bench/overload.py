"""Overload: offered load at several times the fleet's capacity for minutes, through the real proxy.

Fleet: two emulated vLLM instances of llama-2-7b on A10s (``a10-llama2-7b``: KV binds, as on real
small GPUs), real prompt sizes and reply lengths (Azure conv 2023 input sizes, llama-2-7b-chat-hf's
real reply lengths for instructions matched to the trace's output sizes, ``max_tokens`` caps as
clients send them), Poisson arrivals. Proxy: default config, policy ``slo``, next to ``least-load``
(the no-queue baseline) on the same requests in the same run.

1. **Capacity** C: the highest Poisson rate of interactive-only requests at which interactive SLO
   attainment (TTFT <= 1.5 s and TPOT <= 0.10 s, of all offered) stays >= 90% through the proxy
   with ``slo``, searched live (x1.5 steps up from ``--start-rate``, then one bisection step), each
   rate on a fresh fleet for ``--probe-seconds``. ``--capacity`` skips the search.
2. **Scenario A** (the issue's reading): total offered load ``--factor`` x C, of which interactive is
   ``--interactive-share`` x C (within what the fleet can serve: batch already running holds slots
   an interactive arrival may need, so interactive at C itself would miss 90% with any scheduler)
   and the rest batch (sheddable). The proxy must keep interactive on time by putting it first,
   and shed batch early with 429 + Retry-After.
   **Scenario A0** is the reference: scenario A's interactive requests alone (same arrivals, no
   batch). "Kept" means A's interactive attainment is >= 90% and close to A0's: what the capacity
   that exists gives interactive work when nothing else competes.
3. **Scenario B**: interactive alone at ``--factor`` x C. The capacity can carry about C/s on
   time; the figure that matters is on-time interactive per second against C (everyone late is the
   failure mode), and that the excess gets an explicit answer.

Per run it prints offered rates, interactive attainment (of offered, of served), batch rejections
(count, time to the 429 p50/p99, how many carried Retry-After), requests lost (no reply and no
explicit error, e.g. a client timeout or a cut connection: must be 0), the proxy's RSS (VmRSS,
sampled each second: start, max, end, and whether it plateaued: the second half's max within
max(8 MiB, 5%) of the first half's), and /health after the run.

    .venv/bin/python bench/overload.py --minutes 3 --factor 5 [--scenarios A,B] [--capacity RATE]
        [--policies slo,least-load] [--speedup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np

from sloproxy.demo_replay import find_data_dir
from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import RequestRecord, default_slo_classes, slo_met
from sloproxy.evaluation.replay import chat_url, send_one
from sloproxy.evaluation.simulate import proxy_config
from sloproxy.evaluation.workload import WorkloadRequest, write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port

MODEL, GENERATOR, PROFILE = "llama-2-7b", "llama-2-7b-chat-hf", "a10-llama2-7b"
INSTANCES = 2
CLIENT_TIMEOUT_S = 180.0  # a client gives up after this (trace seconds): past the proxy's 120 s queue timeout
OUT = Path(__file__).resolve().parent / "out"

# Per request task: what the response head said (filled by the session's trace hook, read by _send).
_head: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("overload_head")


@dataclass
class Outcome:
    """One request: the replayer's record plus what the head said and when it came."""

    record: RequestRecord
    retry_after: str | None
    head_s: float | None  # trace seconds from send to the response head


@dataclass
class Run:
    label: str
    policy: str
    rates: dict[str, float]
    seconds: float
    outcomes: list[Outcome]
    rss_kib: list[tuple[float, int]] = field(default_factory=list)  # (wall seconds since start, VmRSS)
    healthy_after: bool = False
    send_lag_max_s: float = 0.0


def build_pool(size: int, seed: int = 7) -> list[WorkloadRequest]:
    """``size`` distinct requests with real prompt sizes and reply lengths (arrival times come later)."""
    data = find_data_dir()
    if data is None:
        sys.exit("needs ../shared/data (or $SLOPROXY_DATA)")
    return build_workload(
        BuildOptions(
            trace=str(data / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(data / "lengths"),
            models=parse_models(f"{MODEL}={GENERATOR}"),
            max_requests=size,
            max_context=4096,  # llama-2-7b's context
            max_tokens_caps=(1024, 2048),
            seed=seed,
        )
    )


def poisson(pool: Sequence[WorkloadRequest], rates: dict[str, float], seconds: float, seed: int) -> list:
    """Open-loop arrivals: independent Poisson streams per class (``rates`` per trace second) over
    ``seconds``, drawn as one stream of the total rate whose requests pick their class by rate."""
    rng = random.Random(seed)
    total = sum(rates.values())
    names, weights = list(rates), list(rates.values())
    out, t = [], rng.expovariate(total)
    while t < seconds:
        if len(out) == len(pool):
            sys.exit(f"the pool holds {len(pool)} requests; raise --pool")
        slo_class = rng.choices(names, weights)[0]
        out.append(msgspec.structs.replace(pool[len(out)], arrival_s=round(t, 6), slo_class=slo_class))
        t += rng.expovariate(total)
    return out


def fleet_specs() -> list[InstanceSpec]:
    return [
        InstanceSpec(name=f"vllm-{i}", engine="vllm", model=MODEL, profile=PROFILE, port=free_port())
        for i in range(INSTANCES)
    ]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _record_head(session: object, context: object, params: aiohttp.TraceRequestEndParams) -> None:
    head = _head.get(None)
    if head is not None:
        head["at"] = time.perf_counter()
        head["retry_after"] = params.response.headers.get("Retry-After")


async def _send(session: aiohttp.ClientSession, url: str, request: WorkloadRequest, speedup: float) -> Outcome:
    head: dict[str, Any] = {}
    _head.set(head)  # this task's own context: the trace hook of its request sees it
    started = time.perf_counter()
    record = await send_one(session, url, request, speedup=speedup, timeout_s=CLIENT_TIMEOUT_S)
    at = head.get("at")
    return Outcome(record, head.get("retry_after"), (at - started) * speedup if at is not None else None)


async def drive(url: str, requests: Sequence[WorkloadRequest], speedup: float) -> tuple[list[Outcome], float]:
    """Send each request at its arrival time (never waiting for replies); returns the outcomes and
    the largest send lateness (wall seconds): a load generator that falls behind is visible."""
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_record_head)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    loop = asyncio.get_running_loop()
    lag = 0.0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as session:
        tasks = []
        start = loop.time() + 0.05
        for request in requests:
            due = start + request.arrival_s / speedup
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            lag = max(lag, loop.time() - due)
            tasks.append(asyncio.create_task(_send(session, url, request, speedup)))
        return list(await asyncio.gather(*tasks)), lag


async def sample_rss(pid: int, samples: list[tuple[float, int]], every_s: float = 1.0) -> None:
    started = time.monotonic()
    while True:
        samples.append((time.monotonic() - started, rss_kib(pid)))
        await asyncio.sleep(every_s)


async def health(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/health", timeout=5) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def run(
    label: str, policy: str, requests: list, rates: dict[str, float], seconds: float, lengths: Path, args
) -> Run:
    """One run on a fresh fleet and proxy: drive ``requests``, sample the proxy's memory, check it lives."""
    specs = fleet_specs()
    instances = [msgspec.structs.asdict(s) for s in specs]
    with EmulatorProcess(instances, speedup=args.speedup, extra={"lengths": str(lengths)}):
        config = scaled_config(proxy_config(FleetSpec(instances=specs), policy, base=base_config()), args.speedup)
        with ProxyProcess(msgspec.to_builtins(config)) as proxy:
            assert proxy.process is not None
            result = Run(label, policy, rates, seconds, [])
            sampler = asyncio.create_task(sample_rss(proxy.process.pid, result.rss_kib))
            try:
                result.outcomes, result.send_lag_max_s = await drive(chat_url(proxy.url), requests, args.speedup)
            finally:
                sampler.cancel()
            result.rss_kib.append((result.rss_kib[-1][0] + 1 if result.rss_kib else 0.0, rss_kib(proxy.process.pid)))
            result.healthy_after = await health(proxy.url) and proxy.process.poll() is None
    return result


# ----- figures ------------------------------------------------------------------------------------
CLASSES = default_slo_classes()


def lost(record: RequestRecord) -> bool:
    """Neither a reply nor an explicit error: the client gave up, or the connection or stream was cut."""
    if record.status == "timeout":
        return True
    return record.status == "error" and (record.http_status is None or record.error == "the stream ended before [DONE]")


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def figures(result: Run, capacity: float) -> dict[str, Any]:
    records = [o.record for o in result.outcomes]
    inter = [r for r in records if r.slo_class == "interactive"]
    served = [r for r in inter if r.status == "ok"]
    on_time = sum(slo_met(r, CLASSES) for r in inter)
    batch = [o for o in result.outcomes if o.record.slo_class == "batch"]
    rejected = [o for o in batch if o.record.http_status == 429]
    heads = [o.head_s for o in rejected if o.head_s is not None]
    rss = [kib for _, kib in result.rss_kib]
    half = len(rss) // 2
    first_max, second_max = (max(rss[:half]), max(rss[half:])) if half else (rss[0], rss[-1])
    return {
        "label": result.label,
        "policy": result.policy,
        "offered_rps": result.rates,
        "capacity_rps": capacity,
        "interactive_offered_vs_capacity": result.rates.get("interactive", 0.0) / capacity,
        "total_offered_vs_capacity": sum(result.rates.values()) / capacity,
        "interactive": {
            "offered": len(inter),
            "served": len(served),
            "on_time": on_time,
            "attainment_of_offered": on_time / len(inter) if inter else None,
            "attainment_of_served": on_time / len(served) if served else None,
            "on_time_per_s": on_time / result.seconds,
            "statuses": dict(Counter(str(r.http_status) for r in inter)),
            "ttft_p50_p99_s": [pct([r.ttft_s for r in served if r.ttft_s is not None], q) for q in (50, 99)],
        },
        "batch": {
            "offered": len(batch),
            "served": sum(o.record.status == "ok" for o in batch),
            "on_time": sum(slo_met(o.record, CLASSES) for o in batch),
            "rejected_429": len(rejected),
            "rejected_with_retry_after": sum(o.retry_after is not None for o in rejected),
            "time_to_429_p50_p99_s": [pct(heads, 50), pct(heads, 99)],
            "statuses": dict(Counter(str(o.record.http_status) for o in batch)),
        },
        "lost": sum(lost(r) for r in records),
        "proxy_500": sum(r.http_status == 500 for r in records),
        "rss_mib": {
            "start": rss[0] / 1024,
            "max": max(rss) / 1024,
            "end": rss[-1] / 1024,
            "first_half_max": first_max / 1024,
            "second_half_max": second_max / 1024,
            "plateaued": second_max - first_max <= max(8 * 1024, 0.05 * first_max),
        },
        "healthy_after": result.healthy_after,
        "send_lag_max_s": result.send_lag_max_s,
    }


def _p(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def render(rows: list[dict[str, Any]]) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines: list[tuple[str, ...]] = [("", *(f"{r['label']} {r['policy']}" for r in rows))]

    def add(name: str, get) -> None:
        lines.append((name, *(get(r) for r in rows)))

    add("offered interactive / batch (req/s)", lambda r: " / ".join(f"{v:.2f}" for v in r["offered_rps"].values()))
    add("interactive offered / capacity", lambda r: f"{r['interactive_offered_vs_capacity']:.2f}x")
    add("total offered / capacity", lambda r: f"{r['total_offered_vs_capacity']:.2f}x")
    add(
        "interactive offered / served / on time",
        lambda r: "{offered} / {served} / {on_time}".format(**r["interactive"]),
    )
    add("interactive attainment of offered", lambda r: share(r["interactive"]["attainment_of_offered"]))
    add("interactive attainment of served", lambda r: share(r["interactive"]["attainment_of_served"]))
    add(
        "interactive on time per s / capacity", lambda r: f"{r['interactive']['on_time_per_s'] / r['capacity_rps']:.2f}"
    )
    add("interactive TTFT p50 / p99 (s)", lambda r: _p(r["interactive"]["ttft_p50_p99_s"]))
    add("interactive HTTP statuses", lambda r: str(r["interactive"]["statuses"]))
    add("batch offered / served / on time", lambda r: "{offered} / {served} / {on_time}".format(**r["batch"]))
    add("batch 429 / with Retry-After", lambda r: "{rejected_429} / {rejected_with_retry_after}".format(**r["batch"]))
    add("batch time to 429 p50 / p99 (s)", lambda r: _p(r["batch"]["time_to_429_p50_p99_s"]))
    add("batch HTTP statuses", lambda r: str(r["batch"]["statuses"]))
    add("lost (no reply, no explicit error)", lambda r: str(r["lost"]))
    add("proxy 500s", lambda r: str(r["proxy_500"]))
    add("proxy RSS MiB start / max / end", lambda r: "{start:.0f} / {max:.0f} / {end:.0f}".format(**r["rss_mib"]))
    add("RSS max 1st half / 2nd half", lambda r: "{first_half_max:.0f} / {second_half_max:.0f}".format(**r["rss_mib"]))
    add("RSS plateaued", lambda r: "yes" if r["rss_mib"]["plateaued"] else "NO")
    add("/health after the run", lambda r: "200" if r["healthy_after"] else "FAILED")
    add("load generator max send lag (s)", lambda r: f"{r['send_lag_max_s']:.3f}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


# ----- capacity -----------------------------------------------------------------------------------
async def find_capacity(pool: list, lengths: Path, args) -> tuple[float, list[tuple[float, float]]]:
    """The highest interactive-only Poisson rate whose attainment (of offered) is >= 90% with ``slo``."""
    probes: list[tuple[float, float]] = []

    async def attainment(rate: float) -> float:
        requests = poisson(pool, {"interactive": rate}, args.probe_seconds, seed=11)
        result = await run("capacity", "slo", requests, {"interactive": rate}, args.probe_seconds, lengths, args)
        value = sum(slo_met(o.record, CLASSES) for o in result.outcomes) / max(len(result.outcomes), 1)
        probes.append((rate, value))
        print(f"  capacity probe {rate:.2f} req/s: {len(requests)} requests, attainment {100 * value:.1f}%", flush=True)
        return value

    low, high = 0.0, args.start_rate
    while await attainment(high) >= 0.9:
        low, high = high, high * 1.5
    if low == 0.0:
        sys.exit(f"even {args.start_rate} req/s misses 90%; lower --start-rate")
    middle = (low + high) / 2
    if await attainment(middle) >= 0.9:
        low = middle
    return low, probes


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="overload duration per run (trace minutes)")
    parser.add_argument("--factor", type=float, default=5.0, help="total offered load / capacity")
    parser.add_argument("--interactive-share", type=float, default=0.6, help="scenario A: interactive rate / capacity")
    parser.add_argument("--scenarios", default="A0,A,B")
    parser.add_argument("--policies", default="slo,least-load")
    parser.add_argument("--capacity", type=float, help="skip the search: capacity in req/s")
    parser.add_argument("--start-rate", type=float, default=1.0)
    parser.add_argument("--probe-seconds", type=float, default=60.0)
    parser.add_argument("--speedup", type=float, default=1.0, help="emulated engines K times faster (1: real time)")
    parser.add_argument("--pool", type=int, default=4000, help="distinct requests built from the trace")
    args = parser.parse_args()
    seconds = 60.0 * args.minutes
    pool = build_pool(args.pool)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overload-") as directory:
        lengths = Path(directory) / "pool.jsonl"
        write_workload(lengths, pool)  # the emulator's true reply lengths, keyed by prompt
        probes: list[tuple[float, float]] = []
        if args.capacity is None:
            print("measuring capacity (interactive-only Poisson load, policy slo) ...", flush=True)
            capacity, probes = await find_capacity(pool, lengths, args)
        else:
            capacity = args.capacity
        print(f"capacity C = {capacity:.2f} req/s", flush=True)
        scenarios = {
            "A": {
                "interactive": args.interactive_share * capacity,
                "batch": (args.factor - args.interactive_share) * capacity,
            },
            "B": {"interactive": args.factor * capacity},
        }
        scenarios["A0"] = {"interactive": scenarios["A"]["interactive"]}
        rows = []
        for name in args.scenarios.split(","):
            rates = scenarios[name]
            if name == "A0":  # the reference: scenario A's interactive requests alone, same arrivals
                requests = [r for r in poisson(pool, scenarios["A"], seconds, seed=13) if r.slo_class == "interactive"]
            else:
                requests = poisson(pool, rates, seconds, seed=13)
            for policy in args.policies.split(","):
                print(f"scenario {name}, {policy}: {len(requests)} requests over {seconds:.0f} s ...", flush=True)
                result = await run(name, policy, requests, rates, seconds, lengths, args)
                rows.append(figures(result, capacity))
                dump = OUT / f"overload-{name}-{policy}.jsonl"
                dump.write_bytes(b"".join(msgspec.json.encode(o) + b"\n" for o in result.outcomes))
    print()
    print(f"capacity C = {capacity:.2f} req/s: the highest interactive-only Poisson rate with >= 90% attainment")
    print("(slo policy, live), probes: " + ", ".join(f"{r:.2f} -> {100 * a:.1f}%" for r, a in probes))
    print(render(rows))
    (OUT / "overload.json").write_text(json.dumps({"capacity_rps": capacity, "probes": probes, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
