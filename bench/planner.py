"""Capacity plan vs provisioning for peak on a shared trace: GPU-hours, and SLO attainment by simulation.

Workload: Azure conv 2023 served as ``llama-3-8b`` and Azure code 2023 as ``llama-3-70b`` (one workload,
the two traces merged), both at ``--rate-scale`` (default 4: arrivals 4x faster, so the fleet has several
instances per model and planning has something to size). Profiles: the emulator's performance model run
in virtual time (``sloproxy profile --emulated``) for llama-3-8b on A100 40 GB, A100 80 GB and H100 and
llama-3-70b on 4 x H100, with illustrative per-GPU-hour prices. Both fleets come from the same integer
program: the plan per interval, and one fleet that covers every interval (provisioning for peak).

SLO attainment: the simulator (``sloproxy/evaluation/simulate.py``, policy least-load) cannot resize a fleet
mid-run, so each interval's slice of the trace is simulated on its own with that interval's instance
counts (every slice starts with idle engines), for both fleets alike.

    .venv/bin/python bench/planner.py [--rate-scale 4] [--interval-s 75] [--headroom 0.1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import RequestRecord, RunMeta
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simprep import SimRequest, prepare
from sloproxy.evaluation.simulate import simulate
from sloproxy.evaluation.workload import WorkloadRequest, write_workload
from sloproxy.fleet.emulated import profile_emulated
from sloproxy.fleet.forecast import forecast, measure_demand, read_demand
from sloproxy.fleet.planner import Allocation, Planner
from sloproxy.fleet.profile import INTERACTIVE, InstanceProfile

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# (served model, emulator profile, price of one GPU-hour): illustrative, of the order of public on-demand rates.
PROFILES = [
    ("llama-3-8b", "a100-40g-llama3-8b", 1.3),
    ("llama-3-8b", "a100-80g-llama3-8b", 1.8),
    ("llama-3-8b", "h100-llama3-8b", 2.5),
    ("llama-3-70b", "4xh100-llama3-70b", 2.5),
]
TRACES = [
    ("azure_conv_2023.csv", "llama-3-8b=Meta-Llama-3-8B-Instruct"),
    ("azure_code_2023.csv", "llama-3-70b=Meta-Llama-3-70B-Instruct"),
]
CONCURRENCY = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]
PROMPTS = [256, 512, 1024, 2048, 4096]


def build(rate_scale: float, seed: int) -> list[WorkloadRequest]:
    """Both traces as one workload, ids renumbered in arrival order."""
    merged: list[WorkloadRequest] = []
    for trace, models in TRACES:
        options = BuildOptions(
            trace=str(DATA / "traces" / trace),
            lengths_dir=str(DATA / "lengths"),
            models=parse_models(models),
            rate_scale=rate_scale,
            seed=seed,
            max_context=8192,
        )
        merged += build_workload(options)
    merged.sort(key=lambda r: r.arrival_s)
    return [msgspec.structs.replace(r, id=f"r{i:06d}") for i, r in enumerate(merged)]


def profiles() -> tuple[list[InstanceProfile], dict[tuple[str, str], str]]:
    """Emulated profiles, and (model, GPU type) -> the emulator profile the simulator runs."""
    out: list[InstanceProfile] = []
    names: dict[tuple[str, str], str] = {}
    for model, name, price in PROFILES:
        profile = asyncio.run(profile_emulated(name, model, CONCURRENCY, PROMPTS, cost_per_gpu_hour=price))
        out.append(profile)
        names[profile.key] = name
    return out, names


def simulate_fleet(
    prepared: list[SimRequest],
    fleets: list[list[Allocation]],
    interval_s: float,
    emulator_profile: dict[tuple[str, str], str],
) -> list[RequestRecord]:
    """Each interval's slice of the trace on its own fleet; records with arrivals back on the trace clock."""
    records: list[RequestRecord] = []
    for index, allocations in enumerate(fleets):
        start = index * interval_s
        last = index == len(fleets) - 1
        chunk = [
            dataclasses.replace(r, arrival_s=r.arrival_s - start)
            for r in prepared
            if start <= r.arrival_s and (last or r.arrival_s < start + interval_s)
        ]
        if not chunk:
            continue
        instances = [
            InstanceSpec(
                name=f"{a.model}-{a.gpu_type}-{k}",
                engine="vllm",
                model=a.model,
                port=10000 + 100 * n + k,
                profile=emulator_profile[(a.model, a.gpu_type)],
            )
            for n, a in enumerate(allocations)
            for k in range(a.instances)
        ]
        _, run = simulate(FleetSpec(instances=instances), chunk, "least-load")
        records += [msgspec.structs.replace(r, arrival_s=r.arrival_s + start) for r in run]
    return records


def attainment(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    meta = RunMeta(
        label="x",
        source="simulate",
        workload="",
        target=None,
        speedup=1.0,
        duration_s=duration_s,
        slo_classes={},
        started_at="",
        extra={},
    )
    block = summarize(meta, records)
    out = {"overall": block["overall"]["slo_attainment"]}
    out.update({name: c["slo_attainment"] for name, c in block["classes"].items()})
    by_model: dict[str, list[RequestRecord]] = {}
    for record in records:
        by_model.setdefault(record.model, []).append(record)
    for model, rows in by_model.items():
        out[model] = summarize(meta, rows)["overall"]["slo_attainment"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-scale", type=float, default=4.0)
    parser.add_argument("--interval-s", type=float, default=75.0, help="trace seconds after rate scaling")
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--forecasts", default="seasonal,ewma")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    requests = build(args.rate_scale, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.jsonl"
        write_workload(path, requests)
        records_in = read_demand(path)
    found, emulator_profile = profiles()
    print(
        f"workload: {len(requests)} requests over {requests[-1].arrival_s:.0f} s; profiles in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    prepared = prepare(requests)
    planner = Planner(found, INTERACTIVE, headroom=args.headroom)
    measured = measure_demand(records_in, args.interval_s, args.window_s)
    duration = requests[-1].arrival_s
    results: dict[str, Any] = {"requests": len(requests), "duration_s": duration, "interval_s": args.interval_s}
    peak_done = False
    for method in args.forecasts.split(","):
        plan = planner.plan(forecast(measured, method), args.interval_s)
        runs = [(f"plan ({method})", [i.allocations for i in plan.intervals], plan.gpu_hours, plan.cost)]
        if not peak_done:
            runs.append(("peak", [plan.peak] * len(plan.intervals), plan.peak_gpu_hours, plan.peak_cost))
            peak_done = True
        for label, fleets, gpu_hours, cost in runs:
            t0 = time.perf_counter()
            records = simulate_fleet(prepared, fleets, args.interval_s, emulator_profile)
            results[label] = {
                "gpu_hours": round(gpu_hours, 3),
                "cost": round(cost, 2),
                "instances": [{f"{a.model}@{a.gpu_type}": a.instances for a in f} for f in fleets],
                "attainment": attainment(records, duration),
            }
            print(f"  {label}: simulated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{len(requests)} requests, {duration:.0f} trace s, intervals of {args.interval_s:g} s, "
        f"headroom {args.headroom:.0%}"
    )
    print(
        f"{'fleet':<18} {'GPU-hours':>9} {'cost':>7} {'overall':>8} {'interactive':>11} {'batch':>6} "
        f"{'llama-3-8b':>10} {'llama-3-70b':>11}"
    )
    for label in [k for k in results if isinstance(results[k], dict)]:
        r = results[label]
        a = r["attainment"]
        print(
            f"{label:<18} {r['gpu_hours']:>9.3f} {r['cost']:>7.2f} {a['overall']:>8.1%} "
            f"{a.get('interactive', 0):>11.1%} {a.get('batch', 0):>6.1%} "
            f"{a.get('llama-3-8b', 0):>10.1%} {a.get('llama-3-70b', 0):>11.1%}"
        )
    for label in [k for k in results if isinstance(results[k], dict)]:
        print(
            f"{label}: " + " | ".join(", ".join(f"{k} {v}" for k, v in f.items()) for f in results[label]["instances"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
