"""The default policy judged on traffic it was not tuned on: SLO capacity over a spread of workloads and fleets.

``slo`` was tuned on Azure conv and code windows with ~1,000-token prompts on one mixed fleet. This bench
builds a spread of other traffic from every trace in ``../shared/data`` and from synthetic shapes (long
prompts, long replies, bursts, one model vs two, mostly interactive), on four fleets, and simulates each
with the live scheduler and policies (``sloproxy sweep``'s code). Per case it reports:

* each policy's SLO capacity (highest rate scale with >= 90% overall attainment, found by bisection to 5%):
  round-robin, least-load, ``slo`` with the length predictor, ``slo+median`` (each model's median reply only)
  and ``slo+oracle`` (true lengths): item 4's "what the predictor buys";
* the fleet's throughput limit (``sloproxy/evaluation/limit.py``: least-load with true lengths and no
  deadlines, the highest scale whose queues stay bounded, or the best SLO capacity where that is higher: a
  rate served within the SLOs was sustained) and each capacity as a share of it;
* every policy's attainment on one common grid of loads (fractions of least-load's capacity), to check
  that ``slo`` is below least-load at no load by more than noise.

Cases are split in two: the *tuning* set, looked at while changing the policy, and the *held-out* set,
run only at the end (``--held-out``; ``--all`` for both). Results go to ``bench/out/policy_spread.json``
and a figure ``docs/figures/policy_spread.png``.

    .venv/bin/python bench/policy_spread.py [--held-out | --all] [--only CASE,...] [--jobs 2] [--phases 2]
    .venv/bin/python bench/policy_spread.py --only conv-long,mooncake --noise   # per-phase spread on the grid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mixed_fleet
import peers_slo

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models, parse_shares
from sloproxy.evaluation.limit import throughput_limit
from sloproxy.evaluation.simprep import SimRequest, prepare
from sloproxy.evaluation.sweep import parse_policies, scale_key, search, sweep

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
FIGURE = ROOT / "docs" / "figures" / "policy_spread.png"
POLICIES = "round-robin,least-load,slo,slo+median,slo+oracle"
GRID = (0.5, 0.75, 1.0, 1.25, 1.5)  # x least-load's capacity: the common loads every policy is compared at
LLAMA = "llama-3-8b=Meta-Llama-3-8B-Instruct"
TWO_MODELS = "llama-3-8b=Meta-Llama-3-8B-Instruct,qwen-7b=Infinity-Instruct-3M-0625-Qwen2-7B:0.5"

# name: [(instance, engine, model, profile, window)]
FLEETS: dict[str, list[tuple[str, str, str, str, int]]] = {
    # the peer bench's long-prompt fleet: one model, two engines, every window 8,192
    "four": [(n, e, peers_slo.MODEL, p, peers_slo.WINDOW) for n, e, p in peers_slo.FLEET],
    # eight instances, three engines, windows of 4,096 and 8,192 (bench/mixed_fleet.py's)
    "eight": [(n, e, "llama-3-8b", p, w) for n, e, p, w in mixed_fleet.INSTANCES],
    # one model, KV-bound A10s (4,096 windows) beside an A100 (8,192): long requests fit only the A100
    "kv-one": [
        ("vllm-a100", "vllm", "llama-3-8b", "a100-40g-llama3-8b", 8192),
        ("vllm-a10", "vllm", "llama-3-8b", "a10-llama2-7b", 4096),
        ("sglang-a10", "sglang", "llama-3-8b", "a10-llama2-7b", 4096),
        ("tgi-a10", "tgi", "llama-3-8b", "a10-llama2-7b", 4096),
    ],
    # two models, KV-bound A10s beside A100s
    "two-models": [
        ("vllm-a100", "vllm", "llama-3-8b", "a100-40g-llama3-8b", 8192),
        ("vllm-a10", "vllm", "llama-3-8b", "a10-llama2-7b", 4096),
        ("sglang-a100", "sglang", "qwen-7b", "a100-80g-llama3-8b", 8192),
        ("sglang-a10", "sglang", "qwen-7b", "a10-llama2-7b", 4096),
        ("tgi-a10", "tgi", "qwen-7b", "a10-llama2-7b", 4096),
    ],
}


@dataclass(frozen=True)
class Case:
    """One workload on one fleet; ``build`` holds the workload builder's options besides trace and seed."""

    name: str
    fleet: str
    trace: str
    start_s: float
    duration_s: float
    seed: int
    held_out: bool
    shape: str
    build: dict[str, Any] = field(default_factory=dict)


CASES = [
    # ----- tuning set: looked at while changing the policy -----
    Case("conv-long", "four", "azure_conv_2023.csv", 1800, 600, 5, False, "Azure conv, prompts x3.9 (~4k)",
         {"input_scale": 3.9}),
    Case("mooncake", "four", "mooncake_synthetic.jsonl", 0, 1030, 6, False, "Mooncake, clipped to 8k windows"),
    Case("code-eight", "eight", "azure_code_2023.csv", 2400, 600, 7, False, "Azure code (bursty), unclipped"),
    Case("conv-two", "two-models", "azure_conv_2023.csv", 2400, 300, 8, False, "Azure conv, two models"),
    Case("conv-kv", "kv-one", "azure_conv_2023.csv", 2400, 300, 9, False, "Azure conv, one model, KV-bound A10s"),
    # ----- held out: run once, at the end -----
    Case("conv-long-replies", "four", "azure_conv_2023.csv", 600, 600, 21, True,
         "Azure conv, verbose generator (replies p50 ~550), prompts x2",
         {"input_scale": 2.0, "output_lengths": "dataset", "models": "llama-3-8b=gpt4_1106_preview_verbose"}),
    Case("code-long", "four", "azure_code_2023.csv", 0, 900, 22, True, "Azure code, prompts x3 (bursts, long)",
         {"input_scale": 3.0}),
    Case("conv-interactive", "eight", "azure_conv_2023.csv", 3000, 480, 23, True, "Azure conv, 90% interactive",
         {"classes": "interactive=0.9,batch=0.1"}),
    Case("mooncake-two", "two-models", "mooncake_synthetic.jsonl", 0, 1030, 24, True,
         "Mooncake, two models, 4k/8k windows", {"models": TWO_MODELS}),
]  # fmt: skip


def fleet(name: str) -> FleetSpec:
    instances = [
        InstanceSpec(name=n, engine=e, model=m, profile=p, port=0, max_model_len=w) for n, e, m, p, w in FLEETS[name]
    ]
    return FleetSpec(instances=instances)


def workload(case: Case) -> list[SimRequest]:
    extra = dict(case.build)
    models = parse_models(extra.pop("models", TWO_MODELS if case.fleet == "two-models" else LLAMA))
    classes = extra.pop("classes", None)
    windows = {w for *_, w in FLEETS[case.fleet]}
    options = BuildOptions(
        trace=str(DATA / "traces" / case.trace),
        lengths_dir=str(DATA / "lengths"),
        models=models,
        start_s=case.start_s,
        duration_s=case.duration_s,
        seed=case.seed,
        # one window everywhere: clip as a client of that fleet would; unlike windows: unclipped (the proxy places)
        max_context=windows.pop() if len(windows) == 1 else None,
        **({"classes": parse_shares(classes)} if classes else {}),
        **extra,
    )
    return prepare(build_workload(options))


def run_case(case: Case, jobs: int, phases: int) -> dict[str, Any]:
    spec, requests = fleet(case.fleet), workload(case)
    started = time.perf_counter()
    runs = parse_policies(POLICIES)
    found = search(spec, requests, runs, jobs=jobs, phases=phases)
    limit = throughput_limit(spec, requests)
    least = found["capacity"]["least-load"] or min(found["attainment"]["least-load"])
    grid = sorted({round(least * g, 4) for g in GRID})
    common = sweep(spec, requests, runs, grid, jobs=jobs, phases=phases)
    capacities = found["capacity"]
    # An SLO capacity is a rate the fleet demonstrably sustained: the limit is at least the best of them.
    best = max((c for c in capacities.values() if c is not None), default=None)
    fleet_limit = max((x for x in (limit["limit"], best) if x is not None), default=None)
    return {
        "case": case.name,
        "fleet": case.fleet,
        "shape": case.shape,
        "held_out": case.held_out,
        "requests": len(requests),
        "limit": fleet_limit,
        "limit_least_load": limit["limit"],
        "limit_by_policy": {
            policy: {
                "bracket": list(entry["bracket"]),
                "tail_ttft_s": {scale_key(s): t for s, t in entry["tail_ttft_s"].items()},
            }
            for policy, entry in limit["by_policy"].items()
        },
        "capacity": capacities,
        "bracket": {label: list(pair) for label, pair in found["bracket"].items()},
        "share_of_limit": {
            label: (round(cap / fleet_limit, 3) if cap and fleet_limit else None) for label, cap in capacities.items()
        },
        "grid": {
            label: {scale_key(s): round(v, 4) for s, v in values.items()}
            for label, values in common["attainment"].items()
        },
        "seconds": round(time.perf_counter() - started),
    }


PHASES_S = (0.0, 0.25, 0.5, 0.75)  # load-polling phases (the interval is 1 s): arbitrary live


def phase_spread(case: Case, saved: dict[str, Any]) -> str:
    """least-load and slo at each grid load of a case already run, once per polling phase: how far one phase
    moves a point (the noise ``slo`` is compared with least-load within)."""
    from sloproxy.evaluation.report import summarize
    from sloproxy.evaluation.simulate import simulate

    spec, requests = fleet(case.fleet), workload(case)
    lines = [f"{case.name}: attainment per polling phase {', '.join(f'{p:g}' for p in PHASES_S)} s"]
    for scale in sorted(float(s) for s in saved["grid"]["slo"]):
        cells = []
        for policy in ("least-load", "slo"):
            values = [
                100
                * summarize(*simulate(spec, requests, policy, scale=scale, poll_phase_s=phase))["overall"][
                    "slo_attainment"
                ]
                for phase in PHASES_S
            ]
            shown = " / ".join(f"{v:.1f}" for v in values)
            cells.append(f"{policy} {shown} (mean {sum(values) / len(values):.2f})")
        lines.append(f"  x{scale:g}: " + "; ".join(cells))
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    labels = list(result["capacity"])
    caps = result["capacity"]
    best_other = max((caps[b] or 0) for b in ("round-robin", "least-load"))
    lines = [
        f"### {result['case']} ({'held out' if result['held_out'] else 'tuning'}): {result['shape']}; fleet "
        f"{result['fleet']}; {result['requests']} requests; throughput limit x{result['limit']} (least-load "
        f"without deadlines: x{result['limit_least_load']})",
        "",
        "| policy | SLO capacity | share of limit | vs best baseline | attainment at x least-load's capacity "
        + " / ".join(f"{g:g}" for g in GRID)
        + " |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        cap = caps[label]
        grid = result["grid"][label]
        cells = " / ".join(f"{100 * v:.1f}" for _, v in sorted(grid.items(), key=lambda kv: float(kv[0])))
        ratio = f"{cap / best_other:.2f}x" if cap and best_other else "n/a"
        share = result["share_of_limit"][label]
        lines.append(
            f"| {label} | {'none' if cap is None else f'x{cap:g}'} | {share if share is not None else 'n/a'} "
            f"| {ratio} | {cells} |"
        )
    return "\n".join(lines)


def figure(results: list[dict[str, Any]]) -> bytes:
    """Capacity as a share of the throughput limit, one group of bars per case (held-out cases hatched)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = list(results[0]["capacity"])
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(figsize=(max(7, 1.3 * len(results) + 2), 4.5))
    for i, label in enumerate(labels):
        values = [r["share_of_limit"][label] or 0 for r in results]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(results))]
        bars = axes.bar(xs, values, width, label=label)
        for bar, r in zip(bars, results, strict=True):
            if r["held_out"]:
                bar.set_hatch("//")
    axes.axhline(0.8, color="grey", linestyle=":", label="0.8 of the limit")
    axes.set_xticks(range(len(results)))
    axes.set_xticklabels([r["case"] + ("\n(held out)" if r["held_out"] else "") for r in results], fontsize=8)
    axes.set_ylabel("SLO capacity / throughput limit")
    top = max((r["share_of_limit"][label] or 0) for r in results for label in labels)
    axes.set_ylim(0, max(1.1, top + 0.1))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, ncol=3, loc="upper left")
    axes.set_title("SLO capacity (90% attainment) as a share of the fleet's throughput limit", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--held-out", action="store_true", help="run only the held-out cases")
    which.add_argument("--all", action="store_true", help="run the tuning and the held-out cases")
    which.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--jobs", type=int, default=1, help="simulations in parallel (forked workers)")
    parser.add_argument("--phases", type=int, default=1, help="load-polling phases averaged per point")
    parser.add_argument(
        "--noise", action="store_true", help="for cases already run: least-load and slo per polling phase on the grid"
    )
    args = parser.parse_args()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in CASES}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
        cases = [c for c in CASES if c.name in wanted]
    else:
        cases = [c for c in CASES if args.all or c.held_out == args.held_out]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "policy_spread.json"
    saved = {r["case"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    if args.noise:
        for case in cases:
            if case.name in saved:
                print(phase_spread(case, saved[case.name]), flush=True)
        return
    for case in cases:
        result = run_case(case, args.jobs, args.phases)
        saved[case.name] = result
        print(render(result) + f"\n({result['seconds']} s)\n")
        sys.stdout.flush()
        path.write_text(json.dumps([saved[c.name] for c in CASES if c.name in saved], indent=1))
    ordered = [saved[c.name] for c in CASES if c.name in saved]
    FIGURE.write_bytes(figure(ordered))


if __name__ == "__main__":
    main()
