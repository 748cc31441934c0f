"""The ``sloproxy`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop where available (the production event loop), else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _emulate(args: argparse.Namespace) -> int:
    from .emulator.fleet import InstanceSpec, instance_config, load_fleet, serve_forever

    if args.fleet:
        fleet = load_fleet(args.fleet)
        if args.speedup is not None:
            fleet.speedup = args.speedup
        tables: dict = {}
        configs = [instance_config(spec, fleet, tables) for spec in fleet.instances]
    else:
        missing = [
            flag
            for flag, value in (("--engine", args.engine), ("--model", args.model), ("--port", args.port))
            if value is None
        ]
        if missing:
            print(f"sloproxy emulate: {', '.join(missing)} required without --fleet", file=sys.stderr)
            return 2
        spec = InstanceSpec(
            name=f"{args.engine}-{args.port}",
            engine=args.engine,
            model=args.model,
            port=args.port,
            profile=args.profile,
            host=args.host,
            speedup=args.speedup or 1.0,
            lengths=args.lengths,
            max_model_len=args.max_model_len,
            scheduling_policy=args.scheduling_policy,
            max_num_seqs=args.max_num_seqs,
            max_concurrent_requests=args.max_concurrent_requests,
            sse_space=args.sse_space,
            legacy_errors=args.legacy_errors,
            engine_version=args.engine_version,
            max_queued_requests=args.max_queued_requests,
        )
        configs = [instance_config(spec)]
    run_async(serve_forever(configs))
    return 0


def _check(args: argparse.Namespace) -> int:
    """Validate a proxy config and print it as it takes effect (defaults filled in, secrets masked)."""
    import msgspec
    import yaml

    from .config import load_config

    effective = msgspec.to_builtins(load_config(args.config))  # a bad config: one line, exit 2 (main)
    for backend in effective["backends"]:
        if backend.get("api_key"):
            backend["api_key"] = "***"  # a backend's own credential: never printed
    print(f"# {args.config}: valid; every field as it takes effect")
    print(yaml.safe_dump(effective, sort_keys=False, default_flow_style=None, width=110), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .serve import configure_logging, run_proxy

    config = load_config(args.config)
    if args.host:
        config.listen.host = args.host
    if args.port:
        config.listen.port = args.port
    configure_logging(args.log_level)
    run_async(run_proxy(config, config_path=Path(args.config)))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    """Print the digest to store in the config; the key comes from stdin so no shell history keeps it."""
    from .auth import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        raise ValueError("give the key on standard input, e.g. `sloproxy hash-key < keyfile`")
    print(hash_key(key))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.which == "calibration":
        from .emulator.calibration import main as calibration_main

        return calibration_main(json_output=args.json)
    raise AssertionError(args.which)


def _demo(args: argparse.Namespace) -> int:
    from .demo import ReplaySettings
    from .demo import main as demo_main

    replay = ReplaySettings(
        seconds=args.replay_seconds,
        speedup=args.replay_speedup,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        out_dir=Path(args.out_dir),
    )
    return demo_main(speedup=args.speedup, requests=args.requests, replay=replay)


def build_parser() -> argparse.ArgumentParser:
    from .emulator.profiles import DEFAULT_PROFILE, PROFILES

    parser = argparse.ArgumentParser(prog="sloproxy", description="sloproxy: one subcommand per job.")
    parser.add_argument("--version", action="version", version=f"sloproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a proxy config and print it with every default filled in")
    check.add_argument("--config", required=True, help="proxy YAML config")
    check.set_defaults(func=_check)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="proxy YAML config")
    serve.add_argument("--host", help="listen address (default: the config's listen.host)")
    serve.add_argument("--port", type=int, help="listen port (default: the config's listen.port)")
    serve.add_argument(
        "--log-level",
        default=os.environ.get("SLOPROXY_LOG_LEVEL", "WARNING"),
        help="DEBUG, INFO, WARNING (default, or $SLOPROXY_LOG_LEVEL) or ERROR",
    )
    serve.set_defaults(func=_serve)

    emulate = commands.add_parser("emulate", help="run emulated vLLM / TGI / SGLang engines")
    emulate.add_argument("--fleet", help="fleet YAML: start every instance it lists")
    emulate.add_argument("--engine", choices=("vllm", "tgi", "sglang"), help="one instance of this engine")
    emulate.add_argument("--model", help="served model name")
    emulate.add_argument("--port", type=int, help="its port (one instance; a fleet file gives each its own)")
    emulate.add_argument("--host", default="127.0.0.1", help="listen address")
    emulate.add_argument(
        "--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="GPU and model performance profile"
    )
    emulate.add_argument("--speedup", type=float, default=None, help="divide every duration by K")
    emulate.add_argument("--lengths", help="JSONL of true reply lengths (workload or prompt_hash keyed)")
    emulate.add_argument("--max-model-len", type=int, help="context window (default: the model's, within the KV cache)")
    emulate.add_argument(
        "--scheduling-policy", choices=("fcfs", "priority"), default="fcfs", help="the engine's own queue order"
    )
    emulate.add_argument("--max-num-seqs", type=int, help="most sequences running at once (default: the profile's)")
    emulate.add_argument("--max-concurrent-requests", type=int, default=128, help="TGI: 429 past this")
    emulate.add_argument(
        "--sse-space",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TGI: force 'data: ' (TGI >= 2.1, the default) or, with --no-sse-space, 'data:'",
    )
    emulate.add_argument("--engine-version", help="behave as this engine release (default: the newest modelled)")
    emulate.add_argument("--max-queued-requests", type=int, help="vLLM / SGLang: 503 past this many queued")
    emulate.add_argument("--legacy-errors", action="store_true", help="vLLM: flat error bodies")
    emulate.set_defaults(func=_emulate)

    hash_key = commands.add_parser("hash-key", help="print the sha256 digest of an API key read from stdin")
    hash_key.set_defaults(func=_hash_key)

    bench = commands.add_parser("bench", help="benchmarks that print measured figures")
    bench.add_argument("which", choices=("calibration",), help="calibration: emulated vs measured figures")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=_bench)

    demo = commands.add_parser("demo", help="start an emulated fleet and send it real traffic")
    demo.add_argument("--speedup", type=float, default=4.0, help="the fleet runs this many times faster")
    demo.add_argument("--requests", type=int, default=24, help="OpenAI-client requests in the first half")
    demo.add_argument("--replay-seconds", type=float, default=120.0, help="trace seconds to replay (0: skip)")
    demo.add_argument("--replay-speedup", type=float, default=10.0, help="the trace replays this many times faster")
    demo.add_argument("--policies", default="round-robin,least-load,slo", help="compared in the replay")
    demo.add_argument("--out-dir", default="build/demo", help="run files, figure and HTML report")
    demo.set_defaults(func=_demo)

    from .evaluation.cli import register as register_evaluation

    register_evaluation(commands)
    from .evaluation.sim_cli import register as register_simulator  # simulate, sweep

    register_simulator(commands)
    from .predictor.cli import register as register_predictor

    register_predictor(commands)
    from .fleet.cli import register as register_fleet  # profile, plan

    register_fleet(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # a bad config or file, a port in use: one line, no traceback
        print(f"sloproxy {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):  # Redis unreachable or refusing at start
            print(f"sloproxy {args.command}: Redis: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


def _one_line(exc: BaseException) -> str:
    """An error as one line an operator can act on (what failed, on what)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"the address is already in use ({text})"
    if isinstance(exc, PermissionError) and exc.filename:
        return f"cannot read {exc.filename}: permission denied"
    if isinstance(exc, IsADirectoryError) and exc.filename:
        return f"{exc.filename} is a directory, not a file"
    return text


if __name__ == "__main__":
    sys.exit(main())
