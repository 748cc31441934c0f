"""Instructions per request of the proxy (user space), counted by valgrind's callgrind.

The shared machines' speed drifts by a quarter within minutes, so CPU time per request moves run
to run; instruction counts do not. The proxy runs under callgrind in front of
``bench/fast_backend.py``; one run serves ``--few`` requests, another ``--many``, and the
difference over ``many - few`` is the per-request count (start-up and shutdown cancel out; the
same to about 1% run to run). Health checks and load polling are slowed to once an hour so that
timers do not count in proportion to the (slow) wall time under valgrind.

    .venv/bin/python bench/instructions.py [--policy slo] [--stream] [--concurrency 64]
        [--tree OTHER_CHECKOUT]   # A/B: the same measurement of another checkout of the repository
        [--repeat N]              # N measurements: the median and the range

Needs ``valgrind`` (apt). Each run takes about a minute; the two run side by side. A queued policy's
count moves by a few percent run to run (how many requests a prediction batch holds depends on timing:
``slo`` measured 691-727k over three runs of one commit), so compare medians of ``--repeat 3`` or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sloproxy.processes import free_port  # noqa: E402


async def send(port: int, count: int, concurrency: int, stream: bool) -> None:
    """Exactly ``count`` chat requests over ``concurrency`` keep-alive connections (a raw client)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": stream}
    data = json.dumps(body).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    left = count

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(request)
            received = b""
            while True:
                received += await reader.read(65536)
                if stream:
                    if received.endswith(b"0\r\n\r\n"):
                        break
                    continue
                head, sep, rest = received.partition(b"\r\n\r\n")
                if sep and len(rest) >= int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)):
                    break
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


def counted(tree: Path, config: dict, backend_port: int, count: int, args: argparse.Namespace) -> int:
    """Instructions of a proxy (checkout ``tree``) that started, served ``count`` requests and stopped."""
    workdir = Path(tempfile.mkdtemp(prefix="sloproxy-callgrind-"))
    port = free_port()
    config = {
        **config,
        "listen": {"host": "127.0.0.1", "port": port},
        "backends": [{"name": "b", "engine": "vllm", "url": f"http://127.0.0.1:{backend_port}", "models": ["bench"]}],
    }
    (workdir / "proxy.json").write_text(json.dumps(config))
    out = workdir / "callgrind.out"
    proxy = subprocess.Popen(
        [
            *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
            *(sys.executable, "-m", "sloproxy.cli", "serve", "--config", str(workdir / "proxy.json")),
        ],
        cwd=tree,  # `-m` puts the checkout first on sys.path: its sloproxy, policies and adapters run
        env={**os.environ, "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline or proxy.poll() is not None:
                raise RuntimeError("the proxy did not start under valgrind") from None
            time.sleep(1)
    asyncio.run(send(port, count, args.concurrency, args.stream))
    proxy.terminate()
    proxy.wait(timeout=600)
    return sum(int(m) for m in re.findall(r"^summary: (\d+)", out.read_text(), re.MULTILINE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--few", type=int, default=300)
    parser.add_argument("--many", type=int, default=1300)
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout to measure (default: this one)")
    parser.add_argument("--extra", default="{}", help="JSON merged into the proxy's config")
    parser.add_argument("--repeat", type=int, default=1, help="measure this many times: median and range")
    args = parser.parse_args()
    if subprocess.run(["which", "valgrind"], capture_output=True).returncode != 0:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    config = {
        "policy": {"name": args.policy},
        "health": {"interval_s": 3600},
        "load_polling": {"interval_s": 3600},
        **json.loads(args.extra),
    }
    backend_port = free_port()
    fast_backend = [sys.executable, str(HERE / "fast_backend.py"), "--port", str(backend_port), "--chunks", "16"]
    backend = subprocess.Popen(fast_backend)
    measured = []
    try:
        for _ in range(max(1, args.repeat)):
            with ThreadPoolExecutor(2) as pool:  # the two runs side by side (one core each)
                few, many = pool.map(
                    lambda n: counted(args.tree.resolve(), config, backend_port, n, args), (args.few, args.many)
                )
            measured.append((many - few) / (args.many - args.few))
    finally:
        backend.terminate()
    kind = "streamed" if args.stream else "non-streamed"
    spread = f" (median of {len(measured)}: {', '.join(f'{m:,.0f}' for m in measured)})" if len(measured) > 1 else ""
    print(
        f"{args.tree}: policy {args.policy}, {kind}, concurrency {args.concurrency}: "
        f"{statistics.median(measured):,.0f} instructions per request{spread}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
