"""Subcommands ``sloproxy simulate`` and ``sloproxy sweep``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction) -> None:
    """Add the simulator's subcommands to the ``sloproxy`` parser."""
    simulate = commands.add_parser(
        "simulate", help="simulate a workload through a policy in front of an emulated fleet"
    )
    _common(simulate)
    simulate.add_argument(
        "--policy", required=True, help="policy name (NAME+oracle: with true reply lengths; NAME+median: model medians)"
    )
    simulate.add_argument("--params", help="policy parameters as a JSON object")
    simulate.add_argument("--oracle", action="store_true", help="estimate each reply at its true length")
    simulate.add_argument("--scale", type=float, default=1.0, help="multiply the request rate (arrivals / X)")
    simulate.add_argument("--out", help="run JSONL to write (source=simulate, trace seconds)")
    simulate.add_argument("--label", help="run label in reports (default: the policy)")
    simulate.add_argument("--poll-phase", type=float, default=0.0, help="first load reading at this trace second")
    simulate.add_argument("--overhead-ms", type=float, default=0.0, help="fixed HTTP-path latency added to TTFT/E2E")
    simulate.add_argument("--json", action="store_true", help="print the report as JSON")
    simulate.set_defaults(func=_simulate)

    sweep = commands.add_parser("sweep", help="SLO capacity per policy over rate scales (simulated)")
    _common(sweep)
    sweep.add_argument(
        "--policies", required=True, help="A,B,... (NAME+oracle: with true reply lengths; NAME+median: model medians)"
    )
    sweep.add_argument(
        "--scales",
        help="a fixed grid of rate scales, e.g. 0.5,0.75,1,1.25,1.5,2 (default: search each policy's capacity)",
    )
    sweep.add_argument(
        "--resolution",
        type=float,
        help="search: stop when the capacity's bracket is within this fraction (default 0.05: 5%%)",
    )
    sweep.add_argument("--jobs", type=int, default=1, help="worker processes (the machine may be shared)")
    sweep.add_argument(
        "--phases",
        type=int,
        default=1,
        help="average attainment over N load-polling phases (queued policies are sensitive)",
    )
    sweep.add_argument(
        "--json", action="store_true", help='print {"capacity": ..., "attainment": ...} (a search: and "bracket")'
    )
    sweep.add_argument("--png", help="write attainment vs rate scale per policy")
    sweep.set_defaults(func=_sweep)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", required=True, help="emulator fleet YAML (instances: name, engine, model, ...)")
    parser.add_argument("--workload", required=True, help="workload JSONL (sloproxy workload build)")
    parser.add_argument("--config", help="proxy YAML for scheduling, SLO classes, polling (its backends are ignored)")
    parser.add_argument("--timeout", type=float, default=600.0, help="the client's bound per request, trace seconds")


def _base_config(path: str | None):
    if path is None:
        return None
    from ..config import load_config

    if not Path(path).is_file():
        raise FileNotFoundError(f"proxy config {path} does not exist")
    return load_config(path)


def _params(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params: not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise ValueError("--params: expected a JSON object")
    return params


def _simulate(args: argparse.Namespace) -> int:
    from .records import write_run
    from .report import render_text, report_json, summarize
    from .simprep import load_inputs
    from .simulate import simulate
    from .sweep import split_label

    policy, lengths = split_label(args.policy)
    if args.oracle:
        lengths = "oracle"
    if args.scale <= 0:
        raise ValueError("--scale must be positive")
    base = _base_config(args.config)
    started = time.perf_counter()
    fleet, requests = load_inputs(args.fleet, args.workload)
    prepared = time.perf_counter()
    meta, records = simulate(
        fleet,
        requests,
        policy,
        params=_params(args.params),
        base=base,
        lengths=lengths,
        scale=args.scale,
        timeout_s=args.timeout,
        poll_phase_s=args.poll_phase,
        overhead_s=args.overhead_ms / 1e3,
        label=args.label,
        workload=args.workload,
        fleet_path=args.fleet,
    )
    meta.extra["prepare_s"] = round(prepared - started, 3)
    if args.out:
        write_run(args.out, meta, records)
    summary = summarize(meta, records)
    if args.json:
        print(json.dumps(report_json([summary]), indent=2))
    else:
        print(render_text([summary]))
    print(
        f"{len(records)} requests simulated in {time.perf_counter() - started:.1f} s "
        f"(prepare {prepared - started:.1f} s, {meta.extra['engine_steps']} engine iterations)"
        + (f" -> {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .simprep import load_inputs
    from .sweep import (
        DEFAULT_RESOLUTION,
        check_resolution,
        figure_png,
        parse_policies,
        parse_scales,
        render_table,
        scale_key,
        search,
        sweep,
        to_json,
    )

    runs = parse_policies(args.policies)
    scales = parse_scales(args.scales) if args.scales is not None else None
    if scales is not None and args.resolution is not None:
        raise ValueError("--resolution is for the capacity search: drop it or --scales (a grid runs as given)")
    resolution = check_resolution(DEFAULT_RESOLUTION if args.resolution is None else args.resolution)
    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if args.phases < 1:
        raise ValueError("--phases must be at least 1")
    base = _base_config(args.config)
    fleet, requests = load_inputs(args.fleet, args.workload)
    started = time.perf_counter()

    def progress(result: tuple[str, float, dict[str, Any]]) -> None:
        label, scale, overall = result
        print(
            f"  {label} x{scale_key(scale)}: attainment {100 * (overall['slo_attainment'] or 0):.1f}% "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )

    common = {"base": base, "timeout_s": args.timeout, "jobs": args.jobs, "phases": args.phases, "progress": progress}
    if scales is None:
        result = search(fleet, requests, runs, resolution=resolution, **common)
    else:
        result = sweep(fleet, requests, runs, scales, **common)
    if args.png:
        Path(args.png).write_bytes(figure_png(result, f"{Path(args.workload).name} on {Path(args.fleet).name}"))
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print(render_table(result))
    return 0
