"""Capacity plan vs provisioning for peak on a shared trace: GPU-hours at equal SLO attainment, by simulation.

Workload: Azure conv 2023 served as ``llama-3-8b`` and Azure code 2023 as ``llama-3-70b`` (one workload,
the two traces merged), both at ``--rate-scale`` (default 4: arrivals 4x faster, so the fleet has several
instances per model and planning has something to size). Profiles: the emulator's performance model run
in virtual time (``sloproxy profile --emulated``) for llama-3-8b on A100 40 GB, A100 80 GB and H100 and
llama-3-70b on 4 x H100, with illustrative per-GPU-hour prices. Both fleets come from the same integer
program: the plan per interval, and one fleet that covers every interval (provisioning for peak).

SLO attainment: the simulator (``sloproxy/evaluation/simulate.py``, policy least-load) cannot resize a fleet
mid-run, so each interval's slice of the trace is simulated on its own with that interval's instance
counts (every slice starts with idle engines), for both fleets alike.

Equal attainment: each profile is calibrated (``sloproxy/fleet/calibrate.py``) on the even intervals;
then, per model (models share no instance, so each is simulated alone), every fleet -- peak and plan,
with the profile's capacity and with the calibrated one -- is grown by headroom over ``HEADROOMS`` until
the model's interactive attainment over the whole trace reaches ``--target``; GPU-hours are compared
there. The odd intervals are the hold-out: the calibrated plan's attainment on them is printed apart.

    .venv/bin/python bench/planner.py [--rate-scale 4] [--interval-s 75] [--target 0.9] [--json]
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
from sloproxy.fleet.calibrate import calibrate_profile, interval_slices
from sloproxy.fleet.emulated import profile_emulated
from sloproxy.fleet.forecast import IntervalDemand, forecast, measure_demand, read_demand
from sloproxy.fleet.planner import Allocation, Plan, Planner
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
HEADROOMS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]


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


def hold_out_attainment(records: list[RequestRecord], interval_s: float, count: int) -> float | None:
    """Interactive attainment of the requests in the odd intervals (the ones calibration did not see)."""
    chosen = [
        r for r in records if r.slo_class == "interactive" and min(int(r.arrival_s // interval_s), count - 1) % 2 == 1
    ]
    return attainment(chosen, 1.0)["overall"] if chosen else None


def smallest_headroom(
    label: str,
    plan_at: Any,
    fleets_of: Any,
    prepared: list[SimRequest],
    args: argparse.Namespace,
    emulator_profile: dict[tuple[str, str], str],
    cache: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Grow the headroom over HEADROOMS until interactive attainment reaches the target; the row there
    (or at the largest headroom, marked unmet)."""
    row: dict[str, Any] = {}
    for headroom in HEADROOMS:
        plan = plan_at(headroom)
        fleets, gpu_hours, cost = fleets_of(plan)
        key = json.dumps([[(a.gpu_type, a.instances) for a in f] for f in fleets])
        if key not in cache:
            records = simulate_fleet(prepared, fleets, args.interval_s, emulator_profile)
            every = attainment(records, 1.0)
            cache[key] = {
                "interactive": every.get("interactive", every["overall"]),
                "overall": every["overall"],
                "hold_out": hold_out_attainment(records, args.interval_s, len(fleets)),
            }
        row = {
            "fleet": label,
            "headroom": headroom,
            "gpu_hours": round(gpu_hours, 3),
            "cost": round(cost, 2),
            **cache[key],
            "met": cache[key]["interactive"] >= args.target,
            "instances": [{a.gpu_type: a.instances for a in f} for f in fleets],
        }
        print(
            f"  {label} @ {headroom:.0%}: {gpu_hours:.2f} GPU-h, interactive {row['interactive']:.1%}",
            file=sys.stderr,
        )
        if row["met"]:
            break
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-scale", type=float, default=4.0)
    parser.add_argument("--interval-s", type=float, default=75.0, help="trace seconds after rate scaling")
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--target", type=float, default=0.9, help="interactive attainment per model")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--forecast", default="seasonal", choices=("seasonal", "ewma"))
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
    measured = measure_demand(records_in, args.interval_s, args.window_s)
    count = max(len(rows) for rows in measured.values())
    slices = interval_slices(prepared, min(r.arrival_s for r in records_in), args.interval_s, count)
    calibration_set = range(0, count, 2)
    calibrated: list[InstanceProfile] = []
    results: dict[str, Any] = {
        "requests": len(requests),
        "duration_s": requests[-1].arrival_s,
        "interval_s": args.interval_s,
        "target": args.target,
        "calibration": {},
        "models": {},
    }
    for profile in found:
        t0 = time.perf_counter()
        cal = calibrate_profile(
            profile,
            INTERACTIVE,
            slices,
            measured[(profile.model, "default")],
            calibration_set,
            target=args.target,
            interval_s=args.interval_s,
            window_s=args.window_s,
            emulator_profile=emulator_profile[profile.key],
        )
        calibrated.append(msgspec.structs.replace(profile, calibration=cal))
        results["calibration"][f"{profile.model}@{profile.gpu_type}"] = msgspec.to_builtins(cal)
        print(
            f"calibrated {profile.model}@{profile.gpu_type}: factor {cal.factor:.3f} (needed {cal.needed}, "
            f"smallest {cal.smallest}) in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    for model in sorted({p.model for p in found}):
        demand: dict[tuple[str, str], list[IntervalDemand]] = {
            key: rows for key, rows in forecast(measured, args.forecast).items() if key[0] == model
        }
        own = [r for r in prepared if r.model == model]
        cache: dict[str, dict[str, Any]] = {}
        rows: list[dict[str, Any]] = []
        for capacity, chosen in (("profile", found), ("calibrated", calibrated)):

            def plan_at(
                headroom: float,
                chosen: list[InstanceProfile] = chosen,
                demand: dict[tuple[str, str], list[IntervalDemand]] = demand,
            ) -> Plan:
                return Planner(chosen, INTERACTIVE, headroom=headroom).plan(demand, args.interval_s)

            def per_interval(plan: Plan) -> tuple[list[list[Allocation]], float, float]:
                return [i.allocations for i in plan.intervals], plan.gpu_hours, plan.cost

            def static(plan: Plan) -> tuple[list[list[Allocation]], float, float]:
                return [plan.peak] * len(plan.intervals), plan.peak_gpu_hours, plan.peak_cost

            for label, fleets_of in ((f"peak, {capacity}", static), (f"plan, {capacity}", per_interval)):
                rows.append(smallest_headroom(label, plan_at, fleets_of, own, args, emulator_profile, cache))
        results["models"][model] = rows
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{len(requests)} requests, {results['duration_s']:.0f} trace s, intervals of {args.interval_s:g} s, "
        f"forecast {args.forecast}; target: interactive attainment >= {args.target:.0%} per model over the trace"
    )
    for key, cal in results["calibration"].items():
        print(f"calibration {key}: factor {cal['factor']:.3f} (even intervals; smallest fleets {cal['smallest']})")
    print(
        f"{'model':<12} {'fleet':<22} {'headroom':>8} {'GPU-hours':>9} {'cost':>7} {'interactive':>11} "
        f"{'overall':>8} {'hold-out':>8}"
    )
    totals: dict[str, list[float]] = {}
    for model, rows in results["models"].items():
        for row in rows:
            held = f"{row['hold_out']:.1%}" if row["hold_out"] is not None else "-"
            mark = "" if row["met"] else " (target not reached)"
            print(
                f"{model:<12} {row['fleet']:<22} {row['headroom']:>8.0%} {row['gpu_hours']:>9.3f} "
                f"{row['cost']:>7.2f} {row['interactive']:>11.1%} {row['overall']:>8.1%} {held:>8}{mark}"
            )
            total = totals.setdefault(row["fleet"], [0.0, 0.0, 1.0])
            total[0] += row["gpu_hours"]
            total[1] += row["cost"]
            total[2] = min(total[2], 1.0 if row["met"] else 0.0)
    for label, (gpu_hours, cost, met) in totals.items():
        print(
            f"{'all':<12} {label:<22} {'':>8} {gpu_hours:>9.3f} {cost:>7.2f}{'' if met else '  (target not reached)'}"
        )
    for model, rows in results["models"].items():
        for row in rows:
            fleets = " | ".join(", ".join(f"{k} {v}" for k, v in f.items()) for f in row["instances"][:12])
            print(f"{model} {row['fleet']} @ {row['headroom']:.0%}: {fleets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
