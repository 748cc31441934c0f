"""Why conv's SLO capacity stops where it does: attainment per model side of the mixed fleet.

The policy_capacity fleet serves each model on its own instances (llama-3-8b on the A100 and one A10,
qwen-7b on two A10s), so overall attainment is the request-weighted mean of the two sides and no
policy can move work between them. This prints, per scale and policy (simulated, phase 0), each
side's share of the requests and its attainment, and the qwen attainment that 90% overall would need
with the llama side as the best policy served it.

    .venv/bin/python bench/policy_sides.py [--workload conv] [--scales 1,1.125,1.25]
"""

from __future__ import annotations

import argparse

from policy_capacity import INSTANCES, WORKLOADS, workload

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config
from sloproxy.evaluation.records import run_classes, slo_met
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.simulate import simulate

POLICIES = ("least-load", "slo", "slo+oracle")
TARGET = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="conv")
    parser.add_argument("--scales", default="1,1.125,1.25")
    args = parser.parse_args()
    fleet = FleetSpec(instances=[InstanceSpec(port=0, **spec) for spec in INSTANCES])
    for scale in (float(s) for s in args.scales.split(",")):
        requests = prepare(workload(args.workload, scale))
        sides: dict[str, dict[str, tuple[float, float]]] = {}
        for policy in POLICIES:
            name, _, lengths = policy.partition("+")
            meta, records = simulate(fleet, requests, name, base=base_config(), lengths=lengths or "predicted")
            classes = run_classes(meta)
            per_model = {}
            for model in sorted({r.model for r in records}):
                mine = [r for r in records if r.model == model]
                per_model[model] = (len(mine) / len(records), sum(slo_met(r, classes) for r in mine) / len(mine))
            sides[policy] = per_model
            overall = sum(share * met for share, met in per_model.values())
            text = " | ".join(f"{m} {100 * s:.0f}% of requests, {100 * a:5.1f}% met" for m, (s, a) in per_model.items())
            print(f"x{scale:<6g} {policy:11s} overall {100 * overall:5.1f}%   {text}", flush=True)
        llama_share, llama_best = max((sides[p]["llama-3-8b"] for p in POLICIES), key=lambda side: side[1])
        qwen_share = 1.0 - llama_share
        needed = (TARGET - llama_share * llama_best) / qwen_share
        best_qwen = max(sides[p]["qwen-7b"][1] for p in POLICIES)
        print(
            f"x{scale:<6g} {TARGET:.0%} overall needs qwen-7b >= {100 * needed:.1f}% met "
            f"(with llama at its best, {100 * llama_best:.1f}%); the best policy met {100 * best_qwen:.1f}%\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
