"""Agreement: a live replay (proxy + emulated fleet, both in child processes) vs ``simulate`` on one workload.

The live run is the real thing at speedup K: the emulator fleet started with ``lengths`` = the
workload (true reply lengths), the proxy in front of it with every time constant of its config
divided by K (SLO classes, queue timeout, timer tick, shedding's seconds per token, load polling
interval and staleness), so that in trace seconds it behaves as a real deployment would; the
replayer sends at arrival_s / K and multiplies what it measures by K. The simulation runs the same
workload, fleet and policy with the unscaled config in virtual time. Both are judged by the same
report in trace seconds. Target: overall SLO attainment and p50 TTFT within 10%.

Two things the model takes from the live setup, both measured, not fitted to the result:
* the HTTP path's fixed latency (client -> proxy -> engine -> proxy -> client, a few wall ms on a
  shared machine, x K in trace seconds): idle requests, one at a time, live vs simulated;
* the load-polling phase, arbitrary live: the simulator runs at ``--phases`` phases spread over one
  polling interval and its median is compared (queued policies adapt budgets to readings and can
  swing by several points of attainment with the phase alone; the spread is printed).

    .venv/bin/python bench/sim_vs_live.py [--policies round-robin,edf] [--speedup 8] [--duration 60]
        [--rate-scale 0.25] [--png bench/out/sim_vs_live.png]

The engine emulator restarts for every policy so each starts with an empty prefix cache, as the
simulator does. Live numbers carry the machine's noise: compare them within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import RequestRecord, RunMeta
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.simulate import proxy_config, simulate
from sloproxy.evaluation.workload import write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out"
# One instance of each engine kind on A10s with a 7B model: KV binds, engines queue, TGI blocks at the head.
INSTANCES = [
    {"name": "vllm-0", "engine": "vllm", "model": "llama-3-8b", "profile": "a10-llama2-7b"},
    {"name": "sglang-0", "engine": "sglang", "model": "llama-3-8b", "profile": "a10-llama2-7b"},
    {"name": "tgi-0", "engine": "tgi", "model": "llama-3-8b", "profile": "a10-llama2-7b"},
]


def live_run(
    workload: Path, requests: list, policy: str, speedup: float, fleet: FleetSpec
) -> tuple[RunMeta, list[RequestRecord]]:
    with EmulatorProcess(INSTANCES, speedup=speedup, extra={"lengths": str(workload)}) as emulator:
        routed = FleetSpec(
            instances=[
                msgspec.structs.replace(spec, port=int(emulator.url(spec.name).rsplit(":", 1)[1]))
                for spec in fleet.instances
            ]
        )
        config = scaled_config(proxy_config(routed, policy, base=base_config()), speedup)
        with ProxyProcess(msgspec.to_builtins(config)) as proxy:
            return asyncio.run(
                replay_run(requests, proxy.url, workload=str(workload), label=f"live {policy}", speedup=speedup)
            )


def calibrate_overhead(requests: list, speedup: float, fleet: FleetSpec, workload: Path) -> float:
    """Trace seconds the live HTTP path adds to every TTFT: idle requests sent one at a time."""
    probes = [msgspec.structs.replace(r, arrival_s=4.0 * i) for i, r in enumerate(requests[:12])]
    _, live_records = live_run(workload, probes, "round-robin", speedup, fleet)
    _, sim_records = simulate(fleet, prepare(probes), "round-robin", base=base_config())
    gaps = sorted(
        a.ttft_s - b.ttft_s
        for a, b in zip(live_records, sim_records, strict=True)
        if a.status == b.status == "ok" and a.ttft_s is not None and b.ttft_s is not None
    )
    return max(gaps[len(gaps) // 2], 0.0)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def relative(live: float | None, sim: float | None) -> float | None:
    if live is None or sim is None or live == 0:
        return None
    return (sim - live) / live


def compare(live: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    lo, so = live["overall"], sim["overall"]
    rows = {
        "slo_attainment": (lo["slo_attainment"], so["slo_attainment"]),
        "ttft_p50_s": (lo["ttft_s"]["p50"], so["ttft_s"]["p50"]),
        "ttft_p90_s": (lo["ttft_s"]["p90"], so["ttft_s"]["p90"]),
        "tpot_p50_s": (lo["tpot_s"]["p50"], so["tpot_s"]["p50"]),
        "e2e_p50_s": (lo["e2e_s"]["p50"], so["e2e_s"]["p50"]),
        "rejected": (lo["rejected"], so["rejected"]),
    }
    return {name: {"live": a, "sim": b, "rel_diff": relative(a, b)} for name, (a, b) in rows.items()}


def figure(results: dict[str, tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for axis, (policy, (live_records, sim_records)) in zip(axes[0], results.items(), strict=True):
        for name, records, style in (("live", live_records, "-"), ("simulated", sim_records, "--")):
            values = np.sort([r.ttft_s for r in records if r.status == "ok" and r.ttft_s is not None])
            axis.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("TTFT (trace seconds)")
        axis.set_ylabel("CDF")
        axis.set_title(policy)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="round-robin,edf")
    parser.add_argument("--speedup", type=float, default=8.0)
    parser.add_argument("--duration", type=float, default=60.0, help="trace seconds of Azure conv (from the start)")
    parser.add_argument("--rate-scale", type=float, default=0.25, help="loaded, not saturated, on this fleet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", type=int, default=8, help="simulated load-polling phases per policy")
    parser.add_argument("--png", default=str(OUT / "sim_vs_live.png"))
    parser.add_argument("--json-out", default=str(OUT / "sim_vs_live.json"))
    args = parser.parse_args()
    fleet = FleetSpec(instances=[InstanceSpec(port=0, **spec) for spec in INSTANCES])
    requests = build_workload(
        BuildOptions(
            trace=str(DATA / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(DATA / "lengths"),
            models=parse_models("llama-3-8b=Meta-Llama-3-8B-Instruct"),
            duration_s=args.duration,
            rate_scale=args.rate_scale,
            max_context=4096,  # llama2-7b's context
            max_tokens_caps=(1024, 2048),
            seed=args.seed,
        )
    )
    prepared = prepare(requests)
    print(
        f"workload: {len(requests)} requests over {requests[-1].arrival_s:.0f} trace s; "
        f"fleet: vLLM + SGLang + TGI on a10-llama2-7b; live at speedup {args.speedup:g}",
        file=sys.stderr,
    )
    report: dict[str, Any] = {"requests": len(requests), "speedup": args.speedup, "policies": {}}
    curves: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="simlive-") as directory:
        workload = Path(directory) / "workload.jsonl"
        write_workload(workload, requests)
        overhead = calibrate_overhead(requests, args.speedup, fleet, workload)
        report["overhead_s"] = overhead
        print(f"live HTTP-path overhead: {1e3 * overhead:.1f} ms trace ({1e3 * overhead / args.speedup:.2f} ms wall)")
        interval = base_config().load_polling.interval_s
        for policy in args.policies.split(","):
            live_meta, live_records = live_run(workload, requests, policy, args.speedup, fleet)
            runs = [
                simulate(fleet, prepared, policy, base=base_config(), overhead_s=overhead, poll_phase_s=phase)
                for phase in (interval * i / args.phases for i in range(args.phases))
            ]
            summaries = [summarize(meta, records) for meta, records in runs]
            order = sorted(range(len(runs)), key=lambda i: summaries[i]["overall"]["slo_attainment"])
            middle = order[len(order) // 2]  # the median phase's run stands for the simulation
            rows = compare(summarize(live_meta, live_records), summaries[middle])
            spread = [s["overall"]["slo_attainment"] for s in summaries]
            rows["sim_attainment_over_phases"] = {"min": min(spread), "median": median(spread), "max": max(spread)}
            rows["live_send_lag_p99_ms"] = 1e3 * live_meta.extra.get("send_lag_s", {}).get("p99", 0.0)
            report["policies"][policy] = rows
            curves[policy] = (live_records, runs[middle][1])
            print(f"\n{policy}")
            print(f"  {'metric':<16}{'live':>10}{'sim':>10}{'diff':>9}")
            for name, row in rows.items():
                if isinstance(row, dict) and "live" in row:
                    diff = "n/a" if row["rel_diff"] is None else f"{100 * row['rel_diff']:+.1f}%"
                    print(f"  {name:<16}{row['live']:>10.4g}{row['sim']:>10.4g}{diff:>9}")
            print(
                f"  simulated attainment over {args.phases} polling phases: "
                f"{min(spread):.3f} .. {max(spread):.3f} (median {median(spread):.3f})"
            )
            print(f"  (replay send lag p99 {rows['live_send_lag_p99_ms']:.1f} ms wall)")
    agree = all(
        rows[m]["rel_diff"] is not None and abs(rows[m]["rel_diff"]) <= 0.10
        for rows in report["policies"].values()
        for m in ("slo_attainment", "ttft_p50_s")
    )
    report["agree_within_10pct"] = agree
    print(f"\nattainment and p50 TTFT within 10% for every policy: {agree}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    figure(curves, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
