"""What drain-rate shedding (`scheduling.shed_outwaited`) does to SLO attainment, simulated.

Sheddable (batch) work whose queue's drain rate says it would wait out its deadline is refused at
arrival and shed from the queue. This compares `slo` with it on (the default) and off against
`least-load`, on two fleets:

* the demo fleet (`sloproxy/demo.py`: A100 80 GB and A10 for llama-3-8b, H100 for qwen-7b), 120 s of
  Azure conv at x3, x4 and x5;
* the policy_capacity fleet (three KV-bound A10s next to one A100) on its conv and code workloads,
  at the scales around their capacities.

    .venv/bin/python bench/shedding.py [--only demo|capacity]
"""

from __future__ import annotations

import argparse

import msgspec
from policy_capacity import INSTANCES, workload

from sloproxy.demo import DEMO_FLEET
from sloproxy.demo_replay import GENERATORS, find_data_dir
from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import run_classes, slo_met
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.simulate import simulate
from sloproxy.evaluation.sweep import parse_policies, render_table, sweep


def shedding(on: bool):
    base = base_config()
    return msgspec.structs.replace(base, scheduling=msgspec.structs.replace(base.scheduling, shed_outwaited=on))


def demo() -> None:
    data = find_data_dir()
    assert data is not None, "needs ../shared/data"
    fleet = FleetSpec(
        instances=[InstanceSpec(name=n, engine=e, model=m, profile=p, port=0) for n, e, m, p in DEMO_FLEET]
    )
    models = sorted({m for _, _, m, _ in DEMO_FLEET})
    print("demo fleet, Azure conv 120 s: overall SLO attainment (batch attainment, batch refused)")
    for scale in (3.0, 4.0, 5.0):
        options = BuildOptions(
            trace=str(data / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(data / "lengths"),
            models=parse_models(",".join(f"{m}={GENERATORS[m]}" for m in models)),
            duration_s=120.0,
            rate_scale=scale,
            max_context=4096,
            max_tokens_caps=(1024, 2048),
            seed=1,
        )
        requests = prepare(build_workload(options))
        cells = []
        for label, policy, base in (
            ("slo", "slo", shedding(True)),
            ("slo, shed_outwaited off", "slo", shedding(False)),
            ("least-load", "least-load", shedding(True)),
        ):
            meta, records = simulate(fleet, requests, policy, base=base)
            classes = run_classes(meta)
            batch = [r for r in records if r.slo_class == "batch"]
            overall = sum(slo_met(r, classes) for r in records) / len(records)
            met = sum(slo_met(r, classes) for r in batch) / max(1, len(batch))
            refused = sum(r.status == "rejected" for r in batch)
            cells.append(f"{label} {100 * overall:5.1f}% ({100 * met:.1f}%, {refused}/{len(batch)})")
        print(f"x{scale:g}  " + "   ".join(cells), flush=True)


def capacity() -> None:
    fleet = FleetSpec(instances=[InstanceSpec(port=0, **spec) for spec in INSTANCES])
    for name in ("conv", "code"):
        for on in (True, False):
            result = sweep(
                fleet,
                prepare(workload(name)),
                parse_policies("least-load,slo"),
                [0.5, 0.625, 0.75, 0.875, 1.0],
                base=shedding(on),
                jobs=2,
                phases=2,
            )
            print(f"\npolicy_capacity fleet, {name}, shed_outwaited {'on' if on else 'off'}:")
            print(render_table(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("demo", "capacity"))
    args = parser.parse_args()
    if args.only != "capacity":
        demo()
    if args.only != "demo":
        capacity()


if __name__ == "__main__":
    main()
