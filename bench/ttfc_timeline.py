"""Where a streamed request's time to first chunk goes, stage by stage, through sloproxy.

``bench/proxy_overhead.py`` gives the added TTFC as one number; this splits it. The proxy runs
pinned to core 0 with timestamps taken at seven points of its first-chunk path (wrappers installed
in the proxy process before it starts; each costs well under a microsecond); the client and the
fast backend share core 1, as in ``proxy_overhead.py``. Every timestamp is CLOCK_MONOTONIC
(``perf_counter_ns``), so the client's and the proxy's compare directly. Medians of:

    client send -> read      the request's bytes reach the proxy (data_received)
    read -> parsed           HTTP parse to a queued request
    parsed -> handler        the connection's task runs the route
    handler -> scheduled     authentication, body parsing, classification, scheduler.acquire
    scheduled -> sent        adapter.build and the upstream write
    sent -> first bytes      the engine's answer (head and first event) reaches the proxy
    first bytes -> written   translation and the client write (head and first chunk, one write)
    written -> seen          the client reads it

    .venv/bin/python bench/ttfc_timeline.py [--policy slo] [--streams 300] [--interval-ms 20]
        [--idle-spinner]     # a SCHED_IDLE busy loop on core 0 keeps the proxy's vCPU from halting

``--interval-ms 0`` is back to back (16 chunks in a burst); 20 paces tokens as
``proxy_overhead.py``'s ``+paced`` does, so the proxy's core idles before every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from proxy_overhead import first_chunk_stamps, pinned, wait_http  # noqa: E402

from sloproxy.processes import free_port  # noqa: E402

# (mark, the stage that ends at it); the marks are taken in this order on a request's path
STAGES = [
    ("read", "client send -> read"),
    ("parsed", "read -> parsed"),
    ("handler", "parsed -> handler"),
    ("scheduled", "handler -> scheduled"),
    ("sent", "scheduled -> sent"),
    ("first_bytes", "sent -> first bytes"),
    ("written", "first bytes -> written"),
]


def run_instrumented_proxy(marks_path: str, serve_args: list[str]) -> None:
    """In the proxy's process: wrap the first-chunk path's points with timestamps, then serve."""
    import atexit

    from sloproxy import cli, forward, http_server, upstream

    now = time.perf_counter_ns
    marks: list[tuple[str, int]] = []

    def stamp(cls: type, name: str, mark: str, awaited: bool = False) -> None:
        original = getattr(cls, name)
        if awaited:

            async def wrapper(*args, **kwargs):
                marks.append((mark, now()))
                return await original(*args, **kwargs)
        else:

            def wrapper(*args, **kwargs):
                marks.append((mark, now()))
                return original(*args, **kwargs)

        setattr(cls, name, wrapper)

    stamp(http_server._Connection, "data_received", "read")
    stamp(http_server._Connection, "_enqueue", "parsed")
    stamp(http_server.HTTPServer, "answer", "handler", awaited=True)
    stamp(forward.Forwarder, "_attempt", "scheduled", awaited=True)  # acquire has returned
    stamp(upstream.UpstreamPool, "_send", "sent")
    stamp(upstream._Connection, "data_received", "first_bytes")
    stamp(http_server._Connection, "write", "written")
    atexit.register(lambda: Path(marks_path).write_text(json.dumps(marks)))
    sys.argv = ["sloproxy", *serve_args]
    cli.main()


def stage_times(marks: list[tuple[str, int]], streams: list[tuple[int, int]]) -> dict[str, list[float]]:
    """Microseconds per stage for each stream whose marks were all found between its send and its
    first chunk (marks from health checks or load polling in between are skipped over)."""
    stages: dict[str, list[float]] = {label: [] for _, label in STAGES}
    stages["written -> seen"], stages["TTFC"] = [], []
    for sent, seen in streams:
        found, after = [], sent
        for mark, _ in STAGES:
            at = next((t for m, t in marks if m == mark and after <= t <= seen), None)
            if at is None:
                break
            found.append(at)
            after = at
        if len(found) != len(STAGES):
            continue
        previous = sent
        for (_, label), at in zip(STAGES, found, strict=True):
            stages[label].append((at - previous) / 1e3)
            previous = at
        stages["written -> seen"].append((seen - previous) / 1e3)
        stages["TTFC"].append((seen - sent) / 1e3)
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=20.0, help="0: back to back")
    parser.add_argument("--idle-spinner", action="store_true", help="keep core 0 out of idle (SCHED_IDLE loop)")
    parser.add_argument("--proxy-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy_child:
        run_instrumented_proxy(args.proxy_child[0], args.proxy_child[1:])
        return 0
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="sloproxy-ttfc-"))
    backend_port, proxy_port = free_port(), free_port()
    chunks = "16" if args.interval_ms == 0 else "4"
    backend = [sys.executable, str(HERE / "fast_backend.py"), "--port", str(backend_port)]
    procs = [pinned(1, [*backend, "--chunks", chunks, "--interval-ms", str(args.interval_ms)])]
    config = workdir / "proxy.json"
    config.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "port": proxy_port},
                "backends": [
                    {"name": "b", "engine": "vllm", "url": f"http://127.0.0.1:{backend_port}", "models": ["bench"]}
                ],
                "policy": {"name": args.policy},
            }
        )
    )
    marks_path = workdir / "marks.json"
    proxy = pinned(
        0,
        [sys.executable, __file__, "--proxy-child", str(marks_path), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(proxy)
    if args.idle_spinner:
        procs.append(pinned(0, ["chrt", "-i", "0", sys.executable, "-c", "while True: pass"]))
    try:
        wait_http(f"http://127.0.0.1:{backend_port}/health")
        wait_http(f"http://127.0.0.1:{proxy_port}/health")
        warm = args.streams // 6  # the first streams fill the connection pool and the caches
        through_proxy = asyncio.run(first_chunk_stamps(f"http://127.0.0.1:{proxy_port}", args.streams + warm))[warm:]
        direct = asyncio.run(first_chunk_stamps(f"http://127.0.0.1:{backend_port}", args.streams + warm))[warm:]
    finally:
        proxy.terminate()  # the proxy stops gracefully and writes its marks on the way out
        proxy.wait(timeout=30)
        for proc in procs:
            proc.terminate()
    stages = stage_times(json.loads(marks_path.read_text()), through_proxy)
    pace = "back to back" if args.interval_ms == 0 else f"tokens {args.interval_ms:g} ms apart"
    spinner = ", idle spinner on core 0" if args.idle_spinner else ""
    print(f"policy {args.policy}, {pace}{spinner}: {len(stages['TTFC'])} of {len(through_proxy)} streams")
    for label, values in stages.items():
        print(f"  {label:<24} {statistics.median(values):8.1f} µs")
    direct_us = statistics.median((seen - sent) / 1e3 for sent, seen in direct)
    added = statistics.median(stages["TTFC"]) - direct_us
    print(f"  {'direct TTFC':<24} {direct_us:8.1f} µs  (added by the proxy: {added:.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
