"""Subcommands ``sloproxy workload build``, ``sloproxy replay`` and ``sloproxy report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the ``sloproxy`` parser."""
    workload = commands.add_parser("workload", help="build evaluation workloads from real traces")
    actions = workload.add_subparsers(dest="workload_command", required=True)
    build = actions.add_parser("build", help="trace arrivals + real prompts and reply lengths -> workload JSONL")
    build.add_argument("--trace", required=True, help="Azure 2023 CSV or Mooncake JSONL")
    build.add_argument("--lengths-dir", required=True, help="directory with alpaca_eval_prompts.jsonl and lengths CSV")
    build.add_argument("--models", required=True, help="NAME=GENERATOR[:WEIGHT],... (fleet model = real model)")
    build.add_argument("--classes", default="interactive=0.6,batch=0.4", help="SLO class shares NAME=SHARE,...")
    build.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate (arrivals / X)")
    build.add_argument("--start", type=float, default=0.0, help="skip this many trace seconds")
    build.add_argument("--duration", type=float, help="keep this many trace seconds (before rate scaling)")
    build.add_argument("--max-requests", type=int, help="keep the first N requests of the window")
    build.add_argument("--seed", type=int, default=0, help="every draw is seeded from it (same seed, same file)")
    build.add_argument(
        "--output-lengths",
        choices=("match", "dataset"),
        default="match",
        help="match: instruction whose real length is near the trace's; dataset: any instruction",
    )
    build.add_argument("--max-tokens-share", type=float, default=0.5, help="share of requests sending max_tokens")
    build.add_argument("--max-tokens-caps", default="1024,2048,4096", help="the caps those requests send")
    build.add_argument("--max-context", type=int, help="clip prompts so prompt + reply fits this context")
    build.add_argument(
        "--input-scale", type=float, default=1.0, help="multiply the trace's input sizes (a long-prompt variant)"
    )
    build.add_argument("--out", required=True, help="workload JSONL to write")
    build.set_defaults(func=_build)

    replay = commands.add_parser("replay", help="replay a workload open loop against an OpenAI-compatible URL")
    replay.add_argument("--workload", required=True, help="workload JSONL (sloproxy workload build)")
    replay.add_argument(
        "--target", required=True, help="base URL, e.g. http://127.0.0.1:8000 (several, comma-separated: alternated)"
    )
    replay.add_argument("--out", required=True, help="run JSONL to write")
    replay.add_argument("--speedup", type=float, default=1.0, help="the emulated fleet's speedup K")
    replay.add_argument("--label", help="run label in reports (default: the output file's stem)")
    replay.add_argument("--timeout", type=float, default=600.0, help="per-request bound, trace seconds")
    replay.add_argument("--max-requests", type=int, help="send at most the first N requests")
    replay.add_argument("--max-duration", type=float, help="send arrivals up to this trace second")
    replay.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="default: on a TTY")
    replay.set_defaults(func=_replay)

    report = commands.add_parser("report", help="SLO attainment, goodput and latencies of one or more runs")
    report.add_argument("runs", nargs="+", help="run JSONL files (side by side)")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--html", help="write a self-contained HTML report")
    report.add_argument("--png", help="write the figure (latency CDFs, attainment per class)")
    report.set_defaults(func=_report)


def _build(args: argparse.Namespace) -> int:
    from .build import BuildOptions, build_to_file, parse_models, parse_shares

    try:
        caps = tuple(int(c) for c in args.max_tokens_caps.split(",") if c.strip())
    except ValueError:
        raise ValueError(f"--max-tokens-caps: expected integers, got {args.max_tokens_caps!r}") from None
    options = BuildOptions(
        trace=args.trace,
        lengths_dir=args.lengths_dir,
        models=parse_models(args.models),
        classes=parse_shares(args.classes),
        rate_scale=args.rate_scale,
        start_s=args.start,
        duration_s=args.duration,
        max_requests=args.max_requests,
        seed=args.seed,
        output_lengths=args.output_lengths,
        max_tokens_share=args.max_tokens_share,
        max_tokens_caps=caps,
        max_context=args.max_context,
        input_scale=args.input_scale,
    )
    requests = build_to_file(options, args.out)
    span = requests[-1].arrival_s
    print(f"{len(requests)} requests over {span:.1f} s -> {args.out}", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from ..cli import run_async
    from .records import write_run
    from .replay import replay_run
    from .workload import read_workload

    requests = read_workload(args.workload)
    if not requests:
        raise ValueError(f"{args.workload}: no requests")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    meta, records = run_async(
        replay_run(
            requests,
            args.target,
            workload=args.workload,
            label=args.label or Path(args.out).stem,
            speedup=args.speedup,
            timeout_s=args.timeout,
            limit=args.max_requests,
            max_duration_s=args.max_duration,
            progress=progress,
        )
    )
    write_run(args.out, meta, records)
    lag = meta.extra.get("send_lag_s", {})
    print(f"{len(records)} records -> {args.out} (send lag p99 {1e3 * lag.get('p99', 0.0):.1f} ms)", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .records import read_run
    from .report import figure_png, render_html, render_text, report_json, summarize

    runs = [read_run(path) for path in args.runs]
    summaries = [summarize(meta, records) for meta, records in runs]
    png = figure_png(runs, summaries) if args.png or args.html else None
    if args.png and png is not None:
        Path(args.png).write_bytes(png)
    if args.html and png is not None:
        Path(args.html).write_text(render_html(summaries, png, args.runs), encoding="utf-8")
    if args.json:
        print(json.dumps(report_json(summaries), indent=2))
    else:
        print(render_text(summaries))
    return 0
