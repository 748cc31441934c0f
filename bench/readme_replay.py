"""The README's own fleet file and ``workload build`` command, replayed live through the proxy: how many
requests fail, and why.

Reads both from README.md itself (the ``fleet.yaml`` block and the ``sloproxy workload build`` line), so
what is measured is what a newcomer runs. The fleet starts in a child process with the workload's true
reply lengths at speedup K; the proxy (default policy, every time constant divided by K) sits in front
of it; the workload is replayed open loop at K. Prints the outcome counts and each failure's cause.

    .venv/bin/python bench/readme_replay.py [--speedup 10] [--policy slo] [--duration 600]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shlex
import sys
import tempfile
from pathlib import Path

import msgspec
import yaml

from sloproxy.emulator.fleet import FleetSpec
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.simulate import proxy_config
from sloproxy.evaluation.workload import write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def readme_fleet_and_build() -> tuple[FleetSpec, dict[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    fleet_block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "instances:" in b)
    fleet = msgspec.convert(yaml.safe_load(fleet_block), FleetSpec)
    command = re.search(r"sloproxy workload build (.*?)--out", text, re.S)
    assert command is not None, "README.md shows no `sloproxy workload build` command"
    words = shlex.split(command.group(1).replace("\\\n", " "))
    return fleet, {words[i].lstrip("-"): words[i + 1] for i in range(0, len(words) - 1, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--policy", default="slo")
    parser.add_argument("--duration", type=float, help="trace seconds (default: the README command's)")
    args = parser.parse_args()
    fleet, build = readme_fleet_and_build()
    data = ROOT.parent / "shared" / "data"  # the README's ../shared/data, from the checkout
    options = BuildOptions(
        trace=str(data / "traces" / Path(build["trace"]).name),
        lengths_dir=str(data / "lengths"),
        models=parse_models(build["models"]),
        duration_s=args.duration or float(build["duration"]),
    )
    workload = build_workload(options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.jsonl"
        write_workload(path, workload)
        specs = [msgspec.structs.replace(s, port=free_port()) for s in fleet.instances]
        with EmulatorProcess(
            [msgspec.structs.asdict(s) for s in specs], speedup=args.speedup, extra={"lengths": str(path)}
        ):
            config = scaled_config(
                proxy_config(FleetSpec(instances=specs), args.policy, base=base_config()), args.speedup
            )
            with ProxyProcess(msgspec.to_builtins(config)) as proxy:
                _, records = await replay_run(
                    workload, proxy.url, workload=str(path), label=args.policy, speedup=args.speedup
                )
    statuses = collections.Counter(r.status for r in records)
    print(
        f"{len(records)} requests ({options.trace}, {options.duration_s:g} s, {build['models']}), "
        f"policy {args.policy}, speedup {args.speedup:g}"
    )
    print("  " + ", ".join(f"{status} {count}" for status, count in statuses.most_common()))
    causes = collections.Counter(
        (r.status, r.http_status, re.sub(r"\d+", "N", (r.error or "")[:80])) for r in records if r.status != "ok"
    )
    for (status, http, cause), count in causes.most_common():
        print(f"  {count:5d}  {status} {http}: {cause}")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
