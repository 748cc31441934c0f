"""SLO attainment of one proxy replica against several sharing state in Redis, at the same total load.

The demo's emulated fleet (three engines, two models) and a stretch of the Azure conversation trace,
replayed open loop through ``slo``:

* ``1 embedded``: one replica, embedded state (the reference);
* ``N redis``: N replicas on one private ``redis-server``, requests alternating between them (no
  balancer), so each sees 1/N of the load and the budgets are shared by leased shares;
* ``N embedded``: N replicas that do not coordinate (the control: each spends every budget alone).

Every proxy duration is divided by the speedup, as in ``make demo``; the state's lease and sync
interval are not (they are real-time machinery), which makes the shared runs' coordination lag K
times longer in emulated time than in a real deployment. Prints each run's report, the engines'
peak of requests inside, and what the replicas may hold on each backend (their caps added up, sampled
every 0.5 s); writes ``bench/out/replicas.json``.

    .venv/bin/python bench/replicas.py [--seconds 120] [--speedup 10] [--replicas 3] [--rate-scale 1.0]
                                       [--sync-interval 0.05] [--only embedded|redis|uncoordinated]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import msgspec

from sloproxy.demo import DEMO_FLEET
from sloproxy.demo_replay import GENERATORS, find_data_dir
from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.report import render_text, summarize
from sloproxy.evaluation.simulate import proxy_config
from sloproxy.evaluation.workload import write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.redis_server import RedisServer  # noqa: E402 - the tests' private redis-server


async def peaks(fleet: EmulatorProcess, names: list[str]) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        out = {}
        for name in names:
            async with session.get(fleet.url(name) + "/_emulator/state") as response:
                out[name] = (await response.json())["peak_in_engine"]
        return out


async def sample_caps(urls: list[str], into: dict[str, list[int]], every_s: float = 0.5) -> None:
    """What the fleet may hold on each backend, every ``every_s``: the replicas' caps added up (one
    replica: its budget; on Redis: the shares of the fleet's budget; uncoordinated: each its own)."""
    async with aiohttp.ClientSession() as session:
        while True:
            caps: dict[str, int] = {}
            for url in urls:
                try:
                    async with session.get(url + "/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    continue
                for line in text.splitlines():
                    if line.startswith("sloproxy_backend_cap_requests{"):
                        name = line.split('backend="', 1)[1].split('"', 1)[0]
                        caps[name] = caps.get(name, 0) + int(float(line.rsplit(" ", 1)[1]))
            for name, total in caps.items():
                into.setdefault(name, []).append(total)
            await asyncio.sleep(every_s)


def cap_summary(series: dict[str, list[int]]) -> dict[str, str]:
    """Per backend: median and largest of the sampled caps."""
    return {name: f"p50 {sorted(v)[len(v) // 2]} max {max(v)}" for name, v in sorted(series.items()) if v}


async def one_run(label: str, replicas: int, shared: bool, workload: list, workload_path: Path, args) -> dict:
    specs = [
        InstanceSpec(name=name, engine=engine, model=model, profile=profile, port=free_port())
        for name, engine, model, profile in DEMO_FLEET
    ]
    with ExitStack() as stack:
        fleet = stack.enter_context(
            EmulatorProcess(
                [msgspec.structs.asdict(s) for s in specs], speedup=args.speedup, extra={"lengths": str(workload_path)}
            )
        )
        config = msgspec.to_builtins(
            scaled_config(proxy_config(FleetSpec(instances=specs), "slo", base=base_config()), args.speedup)
        )
        if shared:
            redis = stack.enter_context(RedisServer())
            sync = args.sync_interval
            state = {"backend": "redis", "url": redis.url, "lease_s": max(1.0, 4 * sync), "sync_interval_s": sync}
            config["state"] = state
        proxies = [stack.enter_context(ProxyProcess(dict(config))) for _ in range(replicas)]
        if shared:
            await asyncio.sleep(1.5)  # a new fleet on an empty Redis holds dispatch for one lease
        caps: dict[str, list[int]] = {}
        sampler = asyncio.ensure_future(sample_caps([p.url for p in proxies], caps))
        try:
            urls = ",".join(p.url for p in proxies)
            meta, records = await replay_run(
                workload, urls, workload=str(workload_path), label=label, speedup=args.speedup
            )
        finally:
            sampler.cancel()
        inside = await peaks(fleet, [s.name for s in specs])
    summary = summarize(meta, records)
    summary["engine_peaks"] = inside
    summary["caps"] = cap_summary(caps)
    return summary


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rate-scale", type=float, default=1.0)
    parser.add_argument(
        "--sync-interval", type=float, default=0.05, help="state sync interval, real seconds (0.05: the default)"
    )
    parser.add_argument(
        "--only", choices=("embedded", "redis", "uncoordinated"), help="run one of the three setups (default: all)"
    )
    args = parser.parse_args()
    data = find_data_dir()
    if data is None:
        print("needs ../shared/data (or $SLOPROXY_DATA)", file=sys.stderr)
        return 2
    models = sorted({model for _, _, model, _ in DEMO_FLEET})
    workload = build_workload(
        BuildOptions(
            trace=str(data / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(data / "lengths"),
            models=parse_models(",".join(f"{m}={GENERATORS[m]}" for m in models)),
            duration_s=args.seconds,
            rate_scale=args.rate_scale,
            max_context=4096,
            max_tokens_caps=(1024, 2048),
            seed=1,
        )
    )
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    workload_path = out / "replicas-workload.jsonl"
    write_workload(workload_path, workload)
    n = args.replicas
    setups = {
        "embedded": ("1 embedded", 1, False),
        "redis": (f"{n} redis", n, True),
        "uncoordinated": (f"{n} embedded", n, False),
    }
    summaries = [
        await one_run(label, replicas, shared, workload, workload_path, args)
        for key, (label, replicas, shared) in setups.items()
        if args.only in (None, key)
    ]
    print(render_text(summaries))
    for summary in summaries:
        overall = summary["overall"]["slo_attainment"]
        peaks_seen = summary["engine_peaks"]
        print(f"{summary['label']:12} overall SLO attainment {100 * overall:.1f}%  engine peaks {peaks_seen}")
        print(f"{'':12} caps added up over replicas {summary['caps']}")
    (out / "replicas.json").write_text(json.dumps(summaries, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
