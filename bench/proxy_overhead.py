"""Proxy overhead benchmark: sloproxy vs calling the backend directly, nginx, and LiteLLM's proxy.

Every proxy runs pinned to core 0; the fast backend and the load generator share core 1.
Measures, in one run side by side:

* non-streamed throughput at concurrency 64 (wrk) and latency p50/p99 at concurrency 1 and 64;
* streamed time to first chunk at concurrency 1, back to back and with tokens paced 20 ms
  apart, and at concurrency 64 chunks forwarded per second and the whole reply's latency
  p50/p99 (16 chunks back to back);
* how fast a client disconnect reaches the engine as an abort (emulated vLLM, polled).

    .venv/bin/python bench/proxy_overhead.py [--seconds 10] [--litellm PATH_TO_litellm] [--regions]

sloproxy's dispatch budget starts at ``scheduling.budget_initial`` (8) and grows while the engine
keeps up: this backend reports no KV usage, so it doubles per one-second load reading (slow start;
an engine that reports KV climbs by an eighth, and for its first minute a queued policy would hold
most of the 64 requests in its queue). Each sloproxy target is measured twice at concurrency 64:
``fresh`` (the first ``--seconds`` after start, the first seconds of it queued) and, after a
warm-up that runs until the budget stops growing, ``steady`` (the figure the table reports;
``--no-warm-up`` skips it). The budget at each is printed.

``--regions`` adds ``sl+region``: sloproxy with two regions (``eu`` preferred, ``us``) configured over
the same fast backend (one backend entry per region), side by side with sloproxy with regions off.

Needs ``wrk`` and ``nginx`` (apt). LiteLLM is optional: install it in its own venv and pass
its ``litellm`` executable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port

HERE = Path(__file__).resolve().parent
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
STREAM_BODY = {**BODY, "stream": True}
LATENCIES = ("p50_ms_c1", "p99_ms_c1", "p50_ms_c64", "p99_ms_c64", "stream_p50_ms_c64", "stream_p99_ms_c64")


def pinned(core: int, command: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), *command], **kw)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(url) from None
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx's worker), from /proc."""
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def wrk(url: str, body: dict, connections: int, seconds: float, pid: int | None = None) -> dict:
    """wrk's figures; with ``pid``, also the CPU that process (and its children) spent per request."""
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = \'{json.dumps(body)}\'\nwrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Authorization"] = "Bearer sk-bench"\n'
    )
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu_used = cpu_seconds(pid) - cpu_before if pid is not None else math.nan
    script.unlink()

    def latency(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "cpu_us_per_request": cpu_used / max(1, requests) * 1e6,
        "p50_ms": latency("50%"),
        "p99_ms": latency("99%"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


async def first_chunk_times(url: str, count: int) -> list[float]:
    """Seconds from sending to the first SSE frame, one stream at a time on one keep-alive connection."""
    return [(seen - sent) / 1e9 for sent, seen in await first_chunk_stamps(url, count)]


async def first_chunk_stamps(url: str, count: int) -> list[tuple[int, int]]:
    """(sent, first SSE frame seen) per stream in ``perf_counter_ns`` (CLOCK_MONOTONIC: comparable
    with another process's stamps), one stream at a time on one keep-alive connection.

    A raw asyncio client (not an HTTP library) so the client's own cost stays out of the figure.
    """
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    data = json.dumps(STREAM_BODY).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-bench\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    reader, writer = await asyncio.open_connection(host, int(port))
    stamps = []
    for _ in range(count):
        sent = time.perf_counter_ns()
        writer.write(request)
        received = b""
        while b"data:" not in received:
            received += await reader.read(65536)
        stamps.append((sent, time.perf_counter_ns()))
        while not received.endswith(b"0\r\n\r\n"):  # the rest of the chunked stream
            received += await reader.read(65536)
    writer.close()
    return stamps


def budget_of(url: str) -> float | None:
    """The proxy's dispatch budget for the bench backend (the sum if it has several), from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = "sloproxy_backend_budget_requests{"
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    return sum(values) if values else None


def warm_up(url: str, pid: int, chunk_s: float = 5.0, limit_s: float = 120.0) -> tuple[float, float | None]:
    """Load ``url`` at concurrency 64 until the proxy's budget stops growing (or ``limit_s``):
    returns (seconds spent, the budget)."""
    started = time.monotonic()
    budget = budget_of(url)
    while time.monotonic() - started < limit_s:
        wrk(url + "/v1/chat/completions", BODY, 64, chunk_s, pid)
        now = budget_of(url)
        if now == budget:
            break
        budget = now
    return time.monotonic() - started, budget


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def nginx_proxy(port: int, backend_port: int, workdir: Path) -> subprocess.Popen:
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_cpu_affinity 01;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])


def litellm_proxy(executable: str, port: int, backend_port: int, workdir: Path) -> subprocess.Popen:
    conf = workdir / f"litellm-{port}.yaml"  # one per instance: each reads its own at start-up
    conf.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        "      model: openai/bench\n"
        f"      api_base: http://127.0.0.1:{backend_port}/v1\n"
        "      api_key: unused\n"
    )
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": "sk-bench"}
    return pinned(
        0,
        [executable, "--config", str(conf), "--port", str(port), "--num_workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def abort_latency(samples: int) -> dict:
    """Client disconnect -> the engine's abort counter moves, through the proxy (polled every 2 ms)."""
    instance = {"name": "v", "engine": "vllm", "model": "bench", "profile": "h100-llama3-8b"}
    with EmulatorProcess([instance], speedup=1.0) as fleet:
        config = {"backends": [{"name": "v", "engine": "vllm", "url": fleet.url("v"), "models": ["bench"]}]}
        with ProxyProcess(config) as proxy:
            delays = []
            body = {**STREAM_BODY, "max_tokens": 4000, "ignore_eos": True}
            async with aiohttp.ClientSession() as session:
                for _ in range(samples):
                    async with session.get(fleet.url("v") + "/_emulator/state") as r:
                        before = (await r.json())["finished"].get("abort", 0)
                    response = await session.post(proxy.url + "/v1/chat/completions", json=body)
                    await response.content.readuntil(b"\n\n")
                    gone = time.perf_counter()
                    response.close()
                    while True:
                        async with session.get(fleet.url("v") + "/_emulator/state") as r:
                            if (await r.json())["finished"].get("abort", 0) > before:
                                break
                        await asyncio.sleep(0.002)
                    delays.append((time.perf_counter() - gone) * 1e3)
    return {"samples": samples, "p50_ms": statistics.median(delays), "max_ms": max(delays)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--litellm", help="path to a litellm executable (optional)")
    parser.add_argument("--policy", default="round-robin", help="sloproxy's scheduling policy")
    parser.add_argument("--ttfc-only", action="store_true", help="measure only time to first chunk (quick)")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="measure sloproxy at c64 only fresh, not once its budget settled"
    )
    parser.add_argument(
        "--extra", default="{}", help='JSON merged into sloproxy\'s config, e.g. {"predictor": {"mode": "off"}}'
    )
    parser.add_argument("--sample", type=float, default=1.0, help="with --tracing: the share of requests traced")
    parser.add_argument(
        "--regions",
        action="store_true",
        help="also run sloproxy with two regions over the same backend (region routing on), beside regions off",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run sloproxy with tracing on (OTLP/HTTP to a sink that drops spans), side by side with off",
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install wrk nginx-light util-linux)", file=sys.stderr)
            return 2
    # This process is a load generator too (the streamed-TTFC client): on core 1 with the backend and
    # wrk, never on the proxies' core. Children started without taskset inherit it.
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="sloproxy-bench-"))
    fast_port, slow_port = free_port(), free_port()
    procs = [
        pinned(1, [sys.executable, str(HERE / "fast_backend.py"), "--port", str(fast_port), "--chunks", "16"]),
        pinned(
            1,
            [
                sys.executable,
                str(HERE / "fast_backend.py"),
                "--port",
                str(slow_port),
                "--chunks",
                "4",
                "--interval-ms",
                "20",
            ],
        ),
    ]
    targets: dict[str, tuple[str, str]] = {
        "direct": (f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"),
    }
    pids = {"direct": procs[0].pid}  # whose CPU per request is counted (the fast target's process)
    try:
        for port in (fast_port, slow_port):
            wait_http(f"http://127.0.0.1:{port}/health")
        variants = [("sloproxy", None)]
        if args.tracing:
            sink_port = free_port()
            procs.append(pinned(1, [sys.executable, str(HERE / "fast_backend.py"), "--port", str(sink_port)]))
            wait_http(f"http://127.0.0.1:{sink_port}/health")
            variants.append(("sl+trace", sink_port))
        if args.regions:
            variants.append(("sl+region", None))
        proxies = [
            (f"{v}{suffix}", b, sink) for v, sink in variants for suffix, b in (("", fast_port), ("-slow", slow_port))
        ]
        for label, backend_port, sink in proxies:
            target = label.removesuffix("-slow")
            port = free_port()
            config = workdir / f"{label}.yaml"
            backend = {"engine": "vllm", "url": f"http://127.0.0.1:{backend_port}", "models": ["bench"]}
            regional = {}
            if target == "sl+region":  # the same backend once per region: the region router is built
                backends = [{"name": f"b-{r}", "region": r, **backend} for r in ("eu", "us")]
                regional = {"regions": {"preference": ["eu", "us"]}}
            else:
                backends = [{"name": "b", **backend}]
            config.write_text(
                json.dumps(
                    {
                        "listen": {"host": "127.0.0.1", "port": port},
                        "backends": backends,
                        "policy": {"name": args.policy},
                        **regional,
                        **json.loads(args.extra),
                    }
                )
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            if sink is not None:  # every span exported over OTLP/HTTP (the sink answers 200 to any POST)
                env |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}"}
                env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(args.sample)}
            proxy = pinned(
                0,
                [sys.executable, "-m", "sloproxy.cli", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                env=env,
            )
            procs.append(proxy)
            if label == target:
                pids[target] = proxy.pid
            wait_http(f"http://127.0.0.1:{port}/health")
            targets.setdefault(target, ("", ""))
            fast, slow = targets[target]
            targets[target] = (
                (f"http://127.0.0.1:{port}", slow) if label == target else (fast, f"http://127.0.0.1:{port}")
            )
        nginx_ports = (free_port(), free_port())
        for index, (port, backend_port) in enumerate(zip(nginx_ports, (fast_port, slow_port), strict=True)):
            directory = workdir / f"nginx{index}"
            directory.mkdir()
            procs.append(nginx_proxy(port, backend_port, directory))
            pids.setdefault("nginx", procs[-1].pid)
            wait_http(f"http://127.0.0.1:{port}/health")
        targets["nginx"] = tuple(f"http://127.0.0.1:{p}" for p in nginx_ports)
        if args.litellm:
            ports = (free_port(), free_port())
            for port, backend_port in zip(ports, (fast_port, slow_port), strict=True):
                procs.append(litellm_proxy(args.litellm, port, backend_port, workdir))
                pids.setdefault("litellm", procs[-1].pid)
            for port in ports:
                wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=120)
            targets["litellm"] = tuple(f"http://127.0.0.1:{p}" for p in ports)

        results: dict[str, dict] = {}
        warmed: dict[str, tuple[dict, float, float | None]] = {}  # sloproxy targets: fresh figures, warm-up
        for name, (fast, slow) in targets.items():
            route = "/v1/chat/completions"
            if args.ttfc_only:
                nothing = {"rps": 0.0, "cpu_us_per_request": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "non_2xx": 0}
                throughput = single = streamed = nothing
            else:
                throughput = wrk(fast + route, BODY, 64, args.seconds, pids[name])
                if name.startswith(("sloproxy", "sl+")):
                    fresh = {**throughput, "budget": budget_of(fast)}
                    if not args.no_warm_up:
                        warm_s, _ = warm_up(fast, pids[name])
                        throughput = wrk(fast + route, BODY, 64, args.seconds, pids[name])
                        warmed[name] = (fresh, warm_s, budget_of(fast))
                single = wrk(fast + route, BODY, 1, args.seconds, pids[name])
                streamed = wrk(fast + route, STREAM_BODY, 64, args.seconds)
            ttfc = asyncio.run(first_chunk_times(fast + route, args.streams))
            ttfc_paced = asyncio.run(first_chunk_times(slow + route, args.streams))
            results[name] = {
                "rps_c64": throughput["rps"],
                "cpu_us_c64": throughput["cpu_us_per_request"],
                "cpu_us_c1": single["cpu_us_per_request"],
                "non_2xx": throughput["non_2xx"] + single["non_2xx"],
                "p50_ms_c1": single["p50_ms"],
                "p99_ms_c1": single["p99_ms"],
                "p50_ms_c64": throughput["p50_ms"],
                "p99_ms_c64": throughput["p99_ms"],
                "chunks_per_s_c64": streamed["rps"] * 18,  # role + 16 content chunks + [DONE]
                "stream_p50_ms_c64": streamed["p50_ms"],  # the whole streamed reply
                "stream_p99_ms_c64": streamed["p99_ms"],
                "ttfc_p50_ms": percentile(ttfc, 0.5) * 1e3,
                "ttfc_p99_ms": percentile(ttfc, 0.99) * 1e3,
                "paced_ttfc_p50_ms": percentile(ttfc_paced, 0.5) * 1e3,
                "paced_ttfc_p99_ms": percentile(ttfc_paced, 0.99) * 1e3,
            }
            if name in warmed:  # sloproxy at c64 before its warm-up, beside the settled figures
                fresh, warm_s, budget = warmed[name]
                results[name]["c64_fresh"] = {
                    "rps_c64": fresh["rps"],
                    "cpu_us_c64": fresh["cpu_us_per_request"],
                    "budget": fresh["budget"],
                    "warm_up_s": warm_s,
                    "budget_steady": budget,
                }
        base = results["direct"]
        for row in results.values():
            for figure in LATENCIES:
                row[f"added_{figure}"] = row[figure] - base[figure]
            row["added_ttfc_p50_ms"] = row["ttfc_p50_ms"] - base["ttfc_p50_ms"]
            row["added_paced_ttfc_p50_ms"] = row["paced_ttfc_p50_ms"] - base["paced_ttfc_p50_ms"]
        results["abort_propagation"] = (
            {"samples": 0, "p50_ms": 0.0, "max_ms": 0.0} if args.ttfc_only else asyncio.run(abort_latency(20))
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"{'target':10} {'req/s c64':>10} {'CPU µs':>7} {'p50 c1 ms':>10} {'+p50 ms':>8} {'p99 c1 ms':>10} "
        f"{'TTFC p50':>9} {'+TTFC':>7} {'TTFC p99':>9} {'+paced':>7} {'chunks/s c64':>13}"
    )
    for name, row in results.items():
        if name == "abort_propagation":
            continue
        print(
            f"{name:10} {row['rps_c64']:10.0f} {row['cpu_us_c64']:7.0f} {row['p50_ms_c1']:10.3f} "
            f"{row['added_p50_ms_c1']:8.3f} "
            f"{row['p99_ms_c1']:10.3f} {row['ttfc_p50_ms']:9.2f} {row['added_ttfc_p50_ms']:7.2f} "
            f"{row['ttfc_p99_ms']:9.2f} {row['added_paced_ttfc_p50_ms']:7.2f} {row['chunks_per_s_c64']:13.0f}"
        )
    print(
        f"\n{'latency ms':10} {'p99 c1':>8} {'+p99 c1':>8} {'p50 c64':>8} {'+p50 c64':>9} {'p99 c64':>8} "
        f"{'+p99 c64':>9} {'stream p50 c64':>15} {'+p50':>7} {'stream p99 c64':>15} {'+p99':>7}"
    )
    for name, row in results.items():
        if name == "abort_propagation":
            continue
        print(
            f"{name:10} {row['p99_ms_c1']:8.3f} {row['added_p99_ms_c1']:8.3f} {row['p50_ms_c64']:8.2f} "
            f"{row['added_p50_ms_c64']:9.2f} {row['p99_ms_c64']:8.2f} {row['added_p99_ms_c64']:9.2f} "
            f"{row['stream_p50_ms_c64']:15.2f} {row['added_stream_p50_ms_c64']:7.2f} "
            f"{row['stream_p99_ms_c64']:15.2f} {row['added_stream_p99_ms_c64']:7.2f}"
        )
    print("At concurrency 64 a target's latency is mostly its queue (64 connections / its req/s): the added figures")
    print("there compare capacity as much as overhead. Streamed: the whole 16-chunk reply.")
    nginx_rps = results["nginx"]["rps_c64"]
    for name, steady in results.items():
        row = steady.get("c64_fresh")
        if row is not None:
            print(
                f"{name}: c64 fresh (budget {row['budget']:g}) {row['rps_c64']:.0f} req/s, "
                f"{row['cpu_us_c64']:.0f} µs CPU ({row['rps_c64'] / nginx_rps:.1%} of nginx); steady after "
                f"{row['warm_up_s']:.0f} s of warm-up (budget {row['budget_steady']:g}) {steady['rps_c64']:.0f} req/s, "
                f"{steady['cpu_us_c64']:.0f} µs ({steady['rps_c64'] / nginx_rps:.1%} of nginx)"
            )
    print("CPU µs: the target process's CPU (user + system, with its children) per request at concurrency 64.")
    print("TTFC: back-to-back streams. +paced: added TTFC when the backend paces tokens 20 ms apart (the CPU")
    print("idles between tokens, so each request starts cold).")
    abort = results["abort_propagation"]
    print(
        f"client disconnect -> engine abort: p50 {abort['p50_ms']:.1f} ms, max {abort['max_ms']:.1f} ms "
        f"over {abort['samples']} (polling every 2 ms)"
    )
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"proxy_overhead_{args.policy}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
