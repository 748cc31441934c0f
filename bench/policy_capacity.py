"""SLO capacity of the paper presets vs round-robin, least-load and each preset's oracle variant.

Two workloads on one mixed emulated fleet (two models, three engine kinds, three KV-bound A10
instances next to one A100), simulated with ``sloproxy sweep``'s code (the live scheduler and
policies in virtual time):

* Azure conv 2023, trace seconds 600-840 (a window the policies were not tuned on);
* Azure code 2023, trace seconds 0-300 (bursty; held out entirely).

Both: llama-3-8b (Llama-3-8B-Instruct lengths) and qwen-7b (Qwen2-7B lengths) at 1 : 0.35, 60/40
interactive/batch, ``--max-context 4096 --max-tokens-caps 1024,2048``, seeds fixed. Writes one text
table per workload and a JSON with every attainment to ``bench/out/policy_capacity.json``, and a
figure per workload.

    .venv/bin/python bench/policy_capacity.py [--phases 2] [--jobs 1] [--only conv|code]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.emulator.profiles import get_profile
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.sweep import figure_png, parse_policies, render_table, sweep, to_json

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
MODELS = "llama-3-8b=Meta-Llama-3-8B-Instruct,qwen-7b=Infinity-Instruct-3M-0625-Qwen2-7B:0.35"
INSTANCES = [
    {"name": "vllm-a100", "engine": "vllm", "model": "llama-3-8b", "profile": "a100-40g-llama3-8b"},
    {"name": "vllm-a10", "engine": "vllm", "model": "llama-3-8b", "profile": "a10-llama2-7b"},
    {"name": "sglang-a10", "engine": "sglang", "model": "qwen-7b", "profile": "a10-llama2-7b"},
    {"name": "tgi-a10", "engine": "tgi", "model": "qwen-7b", "profile": "a10-llama2-7b"},
]
WORKLOADS = {
    "conv": {"trace": "azure_conv_2023.csv", "start_s": 600.0, "duration_s": 240.0, "seed": 2},
    "code": {"trace": "azure_code_2023.csv", "start_s": 0.0, "duration_s": 300.0, "seed": 3},
}
PRESETS = ["edf", "ecoserve", "seallm", "uellm", "qlm", "slo"]
SCALES = [0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25]  # 1.125: 1.5x a capacity of 0.75


def workload(name: str, rate_scale: float = 1.0) -> list:
    """The named workload of WORKLOADS (this bench and policy_live.py replay the same requests)."""
    spec = WORKLOADS[name]
    return build_workload(
        BuildOptions(
            trace=str(DATA / "traces" / spec["trace"]),
            lengths_dir=str(DATA / "lengths"),
            models=parse_models(MODELS),
            start_s=spec["start_s"],
            duration_s=spec["duration_s"],
            max_context=4096,
            max_tokens_caps=(1024, 2048),
            seed=spec["seed"],
            rate_scale=rate_scale,
        )
    )


def policies() -> str:
    return ",".join(["round-robin", "least-load", *PRESETS, *(f"{p}+oracle" for p in PRESETS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    args = parser.parse_args()
    fleet = FleetSpec(instances=[InstanceSpec(port=0, **spec) for spec in INSTANCES])
    assert get_profile("a10-llama2-7b").kv_capacity_tokens < 12_000  # the A10 instances are KV-bound
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, spec in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        requests = workload(name)
        started = time.perf_counter()
        result = sweep(
            fleet,
            prepare(requests),
            parse_policies(policies()),
            [float(s) for s in args.scales.split(",")],
            jobs=args.jobs,
            phases=args.phases,
        )
        print(f"\n## {name}: {len(requests)} requests ({spec}), {time.perf_counter() - started:.0f} s\n")
        print(render_table(result))
        sys.stdout.flush()
        results[name] = {"requests": len(requests), **spec, **to_json(result)}
        (OUT / f"policy_capacity_{name}.png").write_bytes(figure_png(result, f"Azure {name}, mixed fleet"))
    path = OUT / ("policy_capacity.json" if not args.only else f"policy_capacity_{args.only}.json")
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
