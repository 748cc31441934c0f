"""Subcommands ``sloproxy profile`` and ``sloproxy plan``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec


def register(commands: argparse._SubParsersAction) -> None:
    """Add the fleet layer's subcommands to the ``sloproxy`` parser."""
    profile = commands.add_parser(
        "profile", help="measure a backend's TTFT and time per token vs concurrency and prompt size"
    )
    where = profile.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="the backend's base URL (live, over HTTP)")
    where.add_argument("--emulated", metavar="PROFILE", help="an emulator profile, run in virtual time (no HTTP)")
    profile.add_argument("--model", required=True, help="served model name")
    profile.add_argument(
        "--engine", choices=("vllm", "tgi", "sglang", "openai"), default="vllm", help="the backend's engine kind"
    )
    profile.add_argument("--gpu-type", help="GPU type name (default: the emulator profile's, else 'unknown')")
    profile.add_argument("--gpus", type=int, help="GPUs per instance (default: the emulator profile's, else 1)")
    profile.add_argument("--cost-per-hour", type=float, default=1.0, help="price of one GPU-hour")
    profile.add_argument("--deployment", help="Kubernetes Deployment name (default: engine-model-gpu)")
    profile.add_argument("--out", help="profile file to write (.json: JSON, else YAML); default: stdout")
    profile.add_argument("--concurrency", default="1,2,4,8,16,32,64,128", help="closed-loop concurrencies")
    profile.add_argument("--prompt-tokens", default="128,512,2048", help="prompt sizes")
    profile.add_argument("--output-tokens", type=int, default=128, help="max_tokens sent with ignore_eos")
    profile.add_argument("--seconds", type=float, default=10.0, help="wall seconds per cell (live)")
    profile.add_argument("--rounds", type=int, default=4, help="requests per client per cell (emulated)")
    profile.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply measured times by K: the emulated engine's --speedup, to report its modelled seconds",
    )
    profile.add_argument("--slo-class", default="interactive", help="SLO class the capacity is derived for")
    profile.add_argument("--full-grid", action="store_true", help="measure every cell (default: stop past the SLO)")
    profile.set_defaults(func=_profile)

    plan = commands.add_parser("plan", help="instance counts per model and GPU type per interval, least GPU cost")
    plan.add_argument("--workload", required=True, help="workload JSONL (arrival_s, model, prompt/output tokens)")
    plan.add_argument("--profiles", nargs="+", required=True, help="profile files (sloproxy profile)")
    plan.add_argument("--slo-class", default="interactive", help="SLO class the fleet must meet")
    plan.add_argument("--interval-s", type=float, default=3600.0, help="planning interval")
    plan.add_argument("--window-s", type=float, default=60.0, help="sliding window of the peak demand rate")
    plan.add_argument("--headroom", type=float, default=0.1, help="capacity above the forecast (0.1: +10%%)")
    plan.add_argument(
        "--forecast", choices=("seasonal", "ewma"), default="seasonal", help="how each interval's demand is forecast"
    )
    plan.add_argument("--alpha", type=float, default=0.5, help="EWMA smoothing")
    plan.add_argument("--min-instances", type=int, default=1, help="per (model, region), every interval")
    plan.add_argument(
        "--gpu-limit",
        action="append",
        default=[],
        metavar="[REGION:]TYPE=N",
        help="at most N GPUs of TYPE (in REGION); repeatable",
    )
    plan.add_argument("--gpu-cost", action="append", default=[], metavar="TYPE=X", help="override a GPU-hour price")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)

    calibrate = commands.add_parser(
        "calibrate", help="derate emulated profiles' capacity by simulating a workload's own requests"
    )
    calibrate.add_argument("--workload", required=True, help="workload JSONL (sloproxy workload build)")
    calibrate.add_argument("--profiles", nargs="+", required=True, help="emulated profile files, updated in place")
    calibrate.add_argument("--slo-class", default="interactive", help="SLO class held to the target")
    calibrate.add_argument("--target", type=float, default=0.9, help="attainment each interval must reach")
    calibrate.add_argument("--interval-s", type=float, default=3600.0, help="as sloproxy plan will use")
    calibrate.add_argument("--window-s", type=float, default=60.0, help="as sloproxy plan will use")
    calibrate.add_argument(
        "--intervals", choices=("all", "even"), default="all", help="even: keep the odd ones to judge the plan on"
    )
    calibrate.set_defaults(func=_calibrate)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


def _profile(args: argparse.Namespace) -> int:
    from ..cli import run_async
    from .profile import default_deployment, save_profile, slo_target

    slo = slo_target(args.slo_class)
    concurrencies = _ints(args.concurrency, "--concurrency")
    prompts = _ints(args.prompt_tokens, "--prompt-tokens")

    def progress(cell: Any) -> None:
        ttft = f"{cell.ttft_p90_s:.3f}" if cell.ttft_p90_s is not None else "-"
        tpot = f"{cell.tpot_p90_s:.4f}" if cell.tpot_p90_s is not None else "-"
        print(
            f"  prompt {cell.prompt_tokens:>6} x{cell.concurrency:<4} requests {cell.requests:>4} errors "
            f"{cell.errors:>3}  TTFT p90 {ttft} s  TPOT p90 {tpot} s  {cell.throughput_rps:.2f} req/s",
            file=sys.stderr,
        )

    if args.emulated:
        from .emulated import profile_emulated

        result = run_async(
            profile_emulated(
                args.emulated,
                args.model,
                concurrencies,
                prompts,
                engine_kind=args.engine if args.engine != "openai" else "vllm",
                output_tokens=args.output_tokens,
                rounds=args.rounds,
                slo=slo,
                cost_per_gpu_hour=args.cost_per_hour,
                deployment=args.deployment,
                full_grid=args.full_grid,
            )
        )
        for cell in result.cells:
            progress(cell)
        if args.gpu_type:
            result.gpu_type = args.gpu_type
        if args.gpus:
            result.gpus_per_instance = args.gpus
    else:
        from .profiler import LiveSettings, profile_live

        settings = LiveSettings(
            target=args.target,
            model=args.model,
            engine=args.engine,
            output_tokens=args.output_tokens,
            seconds=args.seconds,
            time_scale=args.time_scale,
        )
        result = run_async(
            profile_live(
                settings,
                concurrencies,
                prompts,
                slo=slo,
                gpu_type=args.gpu_type or "unknown",
                gpus_per_instance=args.gpus or 1,
                cost_per_gpu_hour=args.cost_per_hour,
                deployment=args.deployment,
                full_grid=args.full_grid,
                progress=progress,
            )
        )
    result.deployment = result.deployment or default_deployment(result)
    for cap in result.capacity:
        print(
            f"SLO {slo.name}: prompt {cap.prompt_tokens}: concurrency {cap.concurrency}, "
            f"{cap.throughput_rps:.2f} req/s, {cap.output_tokens_per_s:.0f} output tokens/s",
            file=sys.stderr,
        )
    if args.out:
        save_profile(args.out, result)
    else:
        sys.stdout.write(msgspec.yaml.encode(result).decode())
    return 0


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item in items:
        for part in item.split(","):
            if part.strip():
                name, sep, value = part.partition("=")
                if not sep or not name.strip() or not value.strip():
                    raise ValueError(f"{what}: expected NAME=VALUE, got {part!r}")
                pairs.append((name.strip(), value.strip()))
    return pairs


def _plan(args: argparse.Namespace) -> int:
    from .forecast import forecast, measure_demand, read_demand
    from .kubernetes import kustomize_replicas
    from .planner import GpuLimit, Planner
    from .profile import load_profile, slo_target

    if args.interval_s <= 0 or args.window_s <= 0:
        raise ValueError("--interval-s and --window-s must be positive")
    for path in [args.workload, *args.profiles]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    profiles = [load_profile(path) for path in args.profiles]
    for gpu_type, value in _pairs(args.gpu_cost, "--gpu-cost"):
        if not any(p.gpu_type == gpu_type for p in profiles):
            raise ValueError(f"--gpu-cost: no profile has GPU type {gpu_type!r}")
        for profile in profiles:
            if profile.gpu_type == gpu_type:
                profile.cost_per_gpu_hour = float(value)
    limits = []
    for name, value in _pairs(args.gpu_limit, "--gpu-limit"):
        region, _, gpu_type = name.rpartition(":")
        limits.append(GpuLimit(gpu_type=gpu_type, gpus=int(value), region=region or None))
    planner = Planner(
        profiles, slo_target(args.slo_class), headroom=args.headroom, min_instances=args.min_instances, limits=limits
    )
    demand = forecast(
        measure_demand(read_demand(args.workload), args.interval_s, args.window_s), args.forecast, args.alpha
    )
    plan = planner.plan(demand, args.interval_s)
    if args.json:
        out = msgspec.to_builtins(plan)
        out["saved_gpu_hours"] = plan.saved_gpu_hours
        out["forecast"] = args.forecast
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"SLO {plan.slo.name}, intervals of {args.interval_s:g} s, "
        f"headroom {args.headroom:.0%}, forecast {args.forecast}"
    )
    for interval in plan.intervals:
        fleet = ", ".join(f"{a.model}@{a.region}: {a.instances} x {a.gpu_type}" for a in interval.allocations)
        need = ", ".join(f"{d.model}@{d.region} {d.rps:.2f} req/s {d.output_tps:.0f} tok/s" for d in interval.demand)
        print(
            f"[{interval.interval}] from {interval.start_s:.0f} s: {fleet}  cost {interval.cost:.2f}, "
            f"{interval.gpu_hours:.2f} GPU-h  (peak demand: {need})"
        )
    peak = ", ".join(f"{a.model}@{a.region}: {a.instances} x {a.gpu_type}" for a in plan.peak)
    print(f"planned: cost {plan.cost:.2f}, {plan.gpu_hours:.2f} GPU-hours")
    print(f"provisioned for peak ({peak}): cost {plan.peak_cost:.2f}, {plan.peak_gpu_hours:.2f} GPU-hours")
    if plan.peak_gpu_hours:
        print(f"saved: {plan.saved_gpu_hours:.2f} GPU-hours ({plan.saved_gpu_hours / plan.peak_gpu_hours:.1%})")
    for index, counts in enumerate(plan.kubernetes):
        print(f"# interval {index}: kustomization.yaml")
        print(kustomize_replicas(counts), end="")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ..evaluation.simprep import prepare
    from ..evaluation.workload import read_workload
    from .calibrate import calibrate_profile, interval_slices
    from .forecast import measure_demand, read_demand
    from .profile import load_profile, save_profile, slo_target

    if args.interval_s <= 0 or args.window_s <= 0:
        raise ValueError("--interval-s and --window-s must be positive")
    slo = slo_target(args.slo_class)
    profiles = [(path, load_profile(path)) for path in args.profiles]
    records = read_demand(args.workload)
    measured = measure_demand(records, args.interval_s, args.window_s)
    count = max(len(rows) for rows in measured.values())
    slices = interval_slices(
        prepare(read_workload(args.workload)), min(r.arrival_s for r in records), args.interval_s, count
    )
    use = range(0, count, 2) if args.intervals == "even" else range(count)
    for path, profile in profiles:
        keys = [key for key in measured if key[0] == profile.model]
        if len(keys) != 1:
            raise ValueError(f"{path}: the workload has {len(keys)} regions of model {profile.model!r} (need one)")
        cal = calibrate_profile(
            profile,
            slo,
            slices,
            measured[keys[0]],
            use,
            target=args.target,
            interval_s=args.interval_s,
            window_s=args.window_s,
            workload=str(args.workload),
        )
        profile.calibration = cal
        save_profile(path, profile)
        print(
            f"{path}: {profile.model} on {profile.gpu_type}: factor {cal.factor:.3f} "
            f"(needed {cal.needed}, smallest fleets {cal.smallest})"
        )
    return 0
