"""A mixed fleet with unlike context windows, on traces replayed without clipping their prompts.

Eight instances of one model on three engines (vLLM, SGLang, TGI) with windows of 4,096 and 8,192
tokens, in front of workloads built from the Azure code and conversation traces with every prompt as
long as the trace says (no ``--max-context``), 50% of requests sending ``max_tokens`` of 1,024 / 2,048
/ 4,096. Simulated with the live scheduler, policies and each engine's length rule
(``sloproxy simulate``'s code). Prints, per workload and policy, the attainment and the failed requests
by cause; with ``--sweep``, each policy's SLO capacity on this fleet (``sloproxy sweep``'s code).

    .venv/bin/python bench/mixed_fleet.py [--policies slo,least-load,round-robin] [--sweep] [--jobs 2]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.simulate import simulate
from sloproxy.evaluation.sweep import parse_policies, render_table, sweep

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
MODELS = "llama-3-8b=Meta-Llama-3-8B-Instruct"
INSTANCES = [
    ("vllm-h100", "vllm", "h100-llama3-8b", 8192),
    ("vllm-a100", "vllm", "a100-80g-llama3-8b", 8192),
    ("vllm-a10", "vllm", "a10-llama2-7b", 4096),
    ("sglang-a100", "sglang", "a100-80g-llama3-8b", 8192),
    ("sglang-a100-40", "sglang", "a100-40g-llama3-8b", 4096),
    ("tgi-a10-1", "tgi", "a10-llama2-7b", 4096),
    ("tgi-a10-2", "tgi", "a10-llama2-7b", 4096),
    ("tgi-a100", "tgi", "a100-40g-llama3-8b", 8192),
]
WORKLOADS = {
    "code": {"trace": "azure_code_2023.csv", "start_s": 1200.0, "duration_s": 900.0, "seed": 11},
    "conv": {"trace": "azure_conv_2023.csv", "start_s": 1800.0, "duration_s": 600.0, "seed": 12},
}
SCALES = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def fleet() -> FleetSpec:
    return FleetSpec(
        instances=[
            InstanceSpec(name=name, engine=engine, model="llama-3-8b", profile=profile, port=0, max_model_len=window)
            for name, engine, profile, window in INSTANCES
        ]
    )


def workload(name: str) -> list:
    spec = WORKLOADS[name]
    return build_workload(
        BuildOptions(
            trace=str(DATA / "traces" / spec["trace"]),
            lengths_dir=str(DATA / "lengths"),
            models=parse_models(MODELS),
            start_s=spec["start_s"],
            duration_s=spec["duration_s"],
            seed=spec["seed"],
        )
    )


def cause(error: str | None) -> str:
    """A failed request's cause, with numbers taken out (one line per kind of failure)."""
    return re.sub(r"\d+", "N", (error or "")[:70])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="slo,least-load,round-robin")
    parser.add_argument("--sweep", action="store_true", help="also find each policy's SLO capacity")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    spec = fleet()
    workloads = {name: workload(name) for name in WORKLOADS}
    prepared = {name: prepare(requests) for name, requests in workloads.items()}
    if args.sweep:
        # First, before this process predicts anything: the sweep forks its workers, and a fork after the
        # length predictor's OpenMP threads have started can deadlock them.
        scales = [float(s) for s in args.scales.split(",")]
        for name in WORKLOADS:
            result = sweep(spec, prepared[name], parse_policies(args.policies), scales, jobs=args.jobs)
            print(f"\n## {name}: SLO capacity\n{render_table(result)}")
            sys.stdout.flush()
    for name, requests in workloads.items():
        too_long = sum(1 for r in requests if r.prompt_tokens >= max(w for *_, w in INSTANCES))
        print(f"\n## {name}: {len(requests)} requests, {too_long} with a prompt no window holds")
        for policy in args.policies.split(","):
            started = time.perf_counter()
            meta, records = simulate(spec, prepared[name], policy)
            summary = summarize(meta, records)["overall"]
            failed = collections.Counter((r.status, r.http_status, cause(r.error)) for r in records if r.status != "ok")
            print(
                f"{policy:12s} attainment {summary['slo_attainment']:.1%}  failed {sum(failed.values())}"
                f"  ({time.perf_counter() - started:.0f} s)"
            )
            for (status, http, text), count in failed.most_common():
                print(f"    {count:5d}  {status} {http}: {text}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
