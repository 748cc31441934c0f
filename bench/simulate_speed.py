"""Simulation speed: one hour of the Azure conv trace (19,366 requests) on an 8-instance fleet.

Target: ``sloproxy simulate`` of the whole hour in <= 60 s on one core, preparation included
(reading the workload, tokenising prompts as the emulator would, block hashes). Builds the
workload once (``sloproxy workload build``, default options), then times each policy in this one
process and prints wall seconds, engine iterations and events.

    .venv/bin/python bench/simulate_speed.py [--policies round-robin,edf] [--scale 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sloproxy.evaluation.build import BuildOptions, build_to_file, parse_models
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simprep import load_inputs
from sloproxy.evaluation.simulate import simulate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLEET = {
    "instances": [
        *({"name": f"vllm-{i}", "engine": "vllm", "model": "llama-3-8b", "port": 9000 + i} for i in range(3)),
        *({"name": f"sglang-{i}", "engine": "sglang", "model": "llama-3-8b", "port": 9010 + i} for i in range(3)),
        *({"name": f"tgi-{i}", "engine": "tgi", "model": "llama-3-8b", "port": 9020 + i} for i in range(2)),
    ]
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="round-robin,edf")
    parser.add_argument("--scale", type=float, default=1.0, help="rate scale (1 = the trace's own rate)")
    parser.add_argument("--profile", action="store_true", help="cProfile the last policy's run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="simspeed-") as directory:
        fleet_path, workload_path = Path(directory) / "fleet.yaml", Path(directory) / "conv1h.jsonl"
        fleet_path.write_text(yaml.safe_dump(FLEET))
        built = time.perf_counter()
        requests = build_to_file(
            BuildOptions(
                trace=str(DATA / "traces" / "azure_conv_2023.csv"),
                lengths_dir=str(DATA / "lengths"),
                models=parse_models("llama-3-8b=Meta-Llama-3-8B-Instruct"),
                max_context=8192,
            ),
            workload_path,
        )
        print(
            f"workload: {len(requests)} requests over {requests[-1].arrival_s:.0f} s "
            f"(built in {time.perf_counter() - built:.1f} s); fleet: 3 vLLM + 3 SGLang + 2 TGI, h100-llama3-8b",
            file=sys.stderr,
        )
        figures = []
        policies = args.policies.split(",")
        for index, policy in enumerate(policies):
            profiler = cProfile.Profile() if args.profile and index == len(policies) - 1 else None
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            fleet, prepared = load_inputs(str(fleet_path), str(workload_path))
            loaded = time.perf_counter()
            meta, records = simulate(fleet, prepared, policy, scale=args.scale)
            done = time.perf_counter()
            if profiler:
                profiler.disable()
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            overall = summarize(meta, records)["overall"]
            figures.append(
                {
                    "policy": policy,
                    "scale": args.scale,
                    "requests": len(records),
                    "total_s": round(done - started, 2),
                    "prepare_s": round(loaded - started, 2),
                    "simulate_s": round(done - loaded, 2),
                    "engine_iterations": meta.extra["engine_steps"],
                    "events": meta.extra["events"],
                    "slo_attainment": round(overall["slo_attainment"], 4),
                    "target_met": done - started <= 60.0,
                }
            )
            print(json.dumps(figures[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
