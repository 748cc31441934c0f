"""Live check of the simulated ranking: replay one workload at one load point through the real proxy
in front of the emulated mixed fleet (child processes, speedup K, every proxy duration divided by K),
for a few policies, and print SLO attainment next to the simulator's for the same point.

    .venv/bin/python bench/policy_live.py [--workload conv] [--scale 0.75] [--speedup 8]
        [--policies round-robin,least-load,edf,slo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import msgspec
from policy_capacity import INSTANCES, OUT, WORKLOADS
from policy_capacity import workload as build_named_workload

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.simulate import proxy_config, simulate
from sloproxy.evaluation.workload import write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="conv")
    parser.add_argument("--scale", type=float, default=0.75)
    parser.add_argument("--speedup", type=float, default=8.0)
    parser.add_argument("--policies", default="round-robin,least-load,edf,slo")
    args = parser.parse_args()
    requests = build_named_workload(args.workload, args.scale)
    fleet = FleetSpec(instances=[InstanceSpec(port=0, **s) for s in INSTANCES])
    prepared = prepare(requests)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="policy-live-") as directory:
        workload = Path(directory) / "workload.jsonl"
        write_workload(workload, requests)
        for policy in args.policies.split(","):
            with EmulatorProcess(INSTANCES, speedup=args.speedup, extra={"lengths": str(workload)}) as emulator:
                routed = FleetSpec(
                    instances=[
                        msgspec.structs.replace(s, port=int(emulator.url(s.name).rsplit(":", 1)[1]))
                        for s in fleet.instances
                    ]
                )
                config = scaled_config(proxy_config(routed, policy, base=base_config()), args.speedup)
                with ProxyProcess(msgspec.to_builtins(config)) as proxy:
                    meta, records = asyncio.run(
                        replay_run(requests, proxy.url, workload=str(workload), label=policy, speedup=args.speedup)
                    )
            live = summarize(meta, records)["overall"]["slo_attainment"]
            sims = [
                summarize(*simulate(fleet, prepared, policy, base=base_config(), poll_phase_s=phase))["overall"]
                for phase in (0.0, 0.5)
            ]
            sim = sum(s["slo_attainment"] for s in sims) / len(sims)
            rows[policy] = {"live": live, "simulated": sim}
            print(f"{policy:12s} live {100 * live:5.1f}%  simulated {100 * sim:5.1f}%", flush=True)
    (OUT / f"policy_live_{args.workload}.json").write_text(json.dumps({"scale": args.scale, **rows}, indent=1))


if __name__ == "__main__":
    main()
