"""Churn: the proxy's own memory and descriptors under minutes of traffic, disconnects and faults.

A proxy replica (child process) in front of three emulated vLLM instances (another child process);
client workers send plain, streamed and hung-up-on requests back to back while faults
(``sloproxy/churn.py``: hang, garbage, reset, kill_mid_stream, slow_first_byte, flap_health) come
and go on backend ``c``. Every few seconds the proxy process's RSS (``/proc/PID/status`` VmRSS) and
open descriptors (``/proc/PID/fd``) are sampled. Prints start / warm / end / max of both, requests
done, outcomes by kind, faults applied, ejections, the reservations left at the end, and whether any
request was lost (neither completed nor given an explicit error). Exit status 1 if any was lost or
any reservation is left.

    .venv/bin/python bench/churn.py [--minutes 30] [--clients 12] [--speedup 20] [--sample-s 5]
                                    [--policy slo] [--faults hang,garbage,reset,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sloproxy.churn import FAULTS, Tally, churn
from sloproxy.processes import EmulatorProcess, ProxyProcess

MODEL = "m"
NAMES = ("a", "b", "c")


def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS in kB, open descriptors) of process ``pid``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def sampler(pid: int, every_s: float, samples: list[tuple[float, int, int]], stop: asyncio.Event) -> None:
    began = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - began, *proc_sample(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def proxy_config(fleet: EmulatorProcess, policy: str) -> dict:
    return {
        "backends": [{"name": n, "engine": "vllm", "url": fleet.url(n), "models": [MODEL]} for n in NAMES],
        "policy": {"name": policy},
        "health": {"interval_s": 0.5, "timeout_s": 0.5, "unhealthy_after": 2, "healthy_after": 2},
        "limits": {"first_byte_timeout_s": 2.0, "read_timeout_s": 10.0},
        "outlier": {"consecutive_failures": 5, "base_ejection_s": 2.0, "max_ejection_s": 30.0},
        "scheduling": {"queue_timeout_s": 30.0},
    }


async def run(args: argparse.Namespace) -> int:
    instances = [{"name": n, "engine": "vllm", "model": MODEL} for n in NAMES]
    with (
        EmulatorProcess(instances, speedup=args.speedup) as fleet,
        ProxyProcess(proxy_config(fleet, args.policy)) as proxy,
    ):
        assert proxy.process is not None
        pid = proxy.process.pid
        samples: list[tuple[float, int, int]] = []
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(pid, args.sample_s, samples, stop))
        await asyncio.sleep(0.2)  # the first sample: the idle proxy
        began = time.monotonic()
        tally = Tally()
        reporter = asyncio.create_task(progress(tally, samples, began))
        faults = args.faults.split(",")
        await churn(
            proxy.url, MODEL, [fleet.url("c")], args.minutes * 60.0, clients=args.clients, tally=tally, faults=faults
        )
        reporter.cancel()
        elapsed = time.monotonic() - began
        await asyncio.sleep(3.0)  # in-flight aborts and health probes settle
        samples.append((time.monotonic() - began, *proc_sample(pid)))
        stop.set()
        await sampling
        metrics = await scrape(proxy.url)
    return report(args, tally, samples, metrics, elapsed)


async def progress(tally: Tally, samples: list[tuple[float, int, int]], began: float) -> None:
    while True:
        await asyncio.sleep(60.0)
        _, rss, fds = samples[-1]
        minutes = (time.monotonic() - began) / 60.0
        print(
            f"  {minutes:5.1f} min: {tally.requests} requests, lost {tally.lost}, RSS {rss / 1024:.1f} MB, {fds} fds",
            flush=True,
        )


def report(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[tuple[float, int, int]],
    metrics: dict[str, list[tuple[dict[str, str], float]]],
    elapsed: float,
) -> int:
    def values(name: str) -> dict[str, float]:
        return {labels.get("backend", ""): value for labels, value in metrics.get(name, [])}

    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    warm = next((s for s in samples if s[0] >= 60.0), samples[len(samples) // 2])
    print(f"churn: {elapsed / 60:.1f} min, {args.clients} clients, speedup {args.speedup:g}, policy {args.policy}")
    print(f"requests: {tally.requests} ({tally.requests / elapsed:.0f}/s)")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())))
    print("faults on c: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.faults.items())))
    print(
        f"RSS MB: start {rss[0] / 1024:.1f}, warm (t={warm[0]:.0f}s) {warm[1] / 1024:.1f}, "
        f"end {rss[-1] / 1024:.1f}, max {max(rss) / 1024:.1f}"
    )
    print(f"FDs: start {fds[0]}, warm {warm[2]}, end {fds[-1]}, max {max(fds)}")
    step = max(1, len(samples) // 10)
    print("samples (s, RSS MB, fds): " + ", ".join(f"({t:.0f}, {r / 1024:.1f}, {f})" for t, r, f in samples[::step]))
    ejections = sorted(values("sloproxy_backend_ejections_total").items())
    print("ejections: " + ", ".join(f"{b} {v:g}" for b, v in ejections))
    in_flight = values("sloproxy_backend_in_flight_requests")
    kv = values("sloproxy_backend_kv_reserved_tokens")
    total = sum(v for _, v in metrics.get("sloproxy_in_flight_requests", []))
    print(f"left at the end: in flight {in_flight}, KV reserved {kv}, requests being served {total:g}")
    lost = tally.lost
    print(f"lost requests (neither completed nor an explicit error): {lost}")
    for example in tally.lost_examples:
        print("  " + example)
    leftover = any(in_flight.values()) or any(kv.values()) or total
    return 1 if lost or leftover else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated modes toggled on backend c")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
