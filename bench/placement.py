"""Placement + swapping vs a static partition: four models on three GPU groups, live.

A multi-model workload built from the real Azure conversation trace (arrivals, prompt and reply
sizes; reply lengths borrowed from four real models' AlpacaEval replies) in three phases whose
demand mix shifts: two models hot, then the other two, then one model alone above one instance's
capacity. It is replayed open loop through the real proxy (policy ``slo``) in front of emulated
vLLM A10 instances (speedup K; every proxy duration divided by K), three ways:

* ``static``: the partition a provisioner would pick for the average mix: the two models with the
  most demand get a GPU each, the other two share the third (swapping within it, as they must);
* ``reactive``: every group can hold every model; the swapper wakes a model when its requests wait
  with nothing routable (issue 10, item 1);
* ``placement``: the same plus proactive placement from measured demand (placement_loop.py).

    .venv/bin/python bench/placement.py [--speedup 8] [--phase-s 120] [--rate 1.0]

Prints SLO attainment overall and per phase, and writes bench/out/placement.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path

import msgspec

from sloproxy.config import BackendConfig, PlacementConfig, SwappingConfig
from sloproxy.emulator.profiles import get_profile
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, ModelMix, build_workload
from sloproxy.evaluation.records import default_slo_classes, slo_met
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.workload import WorkloadRequest, write_workload
from sloproxy.fleet.emulated import profile_emulated
from sloproxy.processes import EmulatorProcess, ProxyProcess

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
PROFILE = "a10-llama2-7b"
GROUPS = ("gpu0", "gpu1", "gpu2")
MODELS = {  # fleet model -> the real model whose reply lengths it borrows
    "m0": "Meta-Llama-3-8B-Instruct",
    "m1": "Mistral-7B-Instruct-v0.2",
    "m2": "Infinity-Instruct-3M-0625-Qwen2-7B",
    "m3": "gemma-7b-it",
}
PHASES = (  # demand shares per phase
    {"m0": 0.45, "m1": 0.45, "m2": 0.05, "m3": 0.05},
    {"m0": 0.05, "m1": 0.05, "m2": 0.45, "m3": 0.45},
    {"m0": 0.85, "m1": 0.15},
)
TRACE_RATE = 19_366 / (0.97 * 3600)  # azure_conv_2023: requests per second, measured over the file
RESIDENTS = {"gpu0": "m0", "gpu1": "m1", "gpu2": "m2"}  # awake at the start, in every variant


def workload(phase_s: float, rate: float) -> list[WorkloadRequest]:
    """The three phases back to back, each ``phase_s`` long at ``rate`` requests/s in all."""
    scale = rate / TRACE_RATE
    requests: list[WorkloadRequest] = []
    for index, shares in enumerate(PHASES):
        options = BuildOptions(
            trace=str(DATA / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(DATA / "lengths"),
            models=[ModelMix(m, MODELS[m], w) for m, w in shares.items()],
            start_s=600.0 + index * phase_s * scale,
            duration_s=phase_s * scale,
            rate_scale=scale,
            max_context=4096,
            max_tokens_caps=(512, 1024, 2048),  # under the instances' 4096-token context with the prompt
            seed=11 + index,
        )
        for request in build_workload(options):
            requests.append(
                msgspec.structs.replace(
                    request, id=f"p{index}-{request.id}", arrival_s=request.arrival_s + index * phase_s
                )
            )
    return requests


def instances() -> list[dict]:
    """Every group has an instance of every model; one per group is awake at the start."""
    return [
        {
            "name": f"{group}-{model}",
            "engine": "vllm",
            "model": model,
            "profile": PROFILE,
            "max_model_len": 4096,
            **({} if RESIDENTS[group] == model else {"start_asleep": 1}),
        }
        for group in GROUPS
        for model in MODELS
    ]


def static_partition(requests: list[WorkloadRequest]) -> dict[str, list[str]]:
    """The best partition for the average mix: the two busiest models alone, the other two shared."""
    busiest = [m for m, _ in Counter(r.model for r in requests).most_common()]
    busiest += [m for m in MODELS if m not in busiest]
    # keep each model where it starts awake when the partition allows it (no swap at start)
    alone, shared = busiest[:2], busiest[2:]
    layout: dict[str, list[str]] = {}
    free = list(GROUPS)
    for model in alone:
        home = next((g for g in free if RESIDENTS[g] == model), None)
        if home is not None:
            layout[home] = [model]
            free.remove(home)
    for model in alone:
        if not any(model in ms for ms in layout.values()):
            layout[free.pop(0)] = [model]
    layout[free.pop(0)] = shared
    return layout


def proxy_config(
    fleet: EmulatorProcess, variant: str, layout: dict[str, list[str]], capacity: float, swap_s: float, speedup: float
) -> dict:
    if variant == "static":
        pairs = [(group, model) for group, models in layout.items() for model in models]
    else:
        pairs = [(group, model) for group in GROUPS for model in MODELS]
    backends = [
        BackendConfig(
            name=f"{group}-{model}", engine="vllm", url=fleet.url(f"{group}-{model}"), models=[model], gpu_group=group
        )
        for group, model in pairs
    ]
    placement = PlacementConfig(
        enabled=variant == "placement",
        window_s=30.0,
        min_interval_s=5.0,
        max_interval_s=30.0,
        horizon_s=60.0,
        default_swap_s=swap_s,
        capacity_rps=dict.fromkeys(MODELS, capacity),
    )
    config = msgspec.structs.replace(base_config(), backends=backends, swapping=SwappingConfig(placement=placement))
    return msgspec.to_builtins(scaled_config(config, speedup))


def attainment(records, classes) -> float:
    return sum(slo_met(r, classes) for r in records) / max(1, len(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=8.0)
    parser.add_argument("--phase-s", type=float, default=120.0, help="emulated seconds per phase")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per emulated second, all models")
    parser.add_argument("--variants", default="static,reactive,placement")
    parser.add_argument("--verbose", action="store_true", help="print the commonest errors of each variant")
    args = parser.parse_args()
    speedup = args.speedup
    requests = workload(args.phase_s, args.rate)
    layout = static_partition(requests)
    # One instance's capacity within the interactive SLO at the workload's mean request, from the
    # emulated profile (as `sloproxy profile` would measure it live), and a swap's cost from the
    # emulator's model of a level-1 swap (what the swapper measures after its first swaps).
    prompt = round(sum(r.prompt_tokens for r in requests) / len(requests))
    output = round(sum(r.output_tokens for r in requests) / len(requests))
    profile = asyncio.run(profile_emulated(PROFILE, "m", [1, 2, 4, 8, 16], [prompt], output_tokens=output))
    capacity = profile.capacity[0].throughput_rps
    model = get_profile(PROFILE)
    swap_s = 2 * model.model.weight_bytes / model.host_to_device_bytes_per_s
    classes = default_slo_classes()
    counts = Counter(r.model for r in requests)
    print(f"{len(requests)} requests over {len(PHASES)} phases of {args.phase_s:g}s: {dict(sorted(counts.items()))}")
    print(
        f"static partition: {layout}; capacity {capacity:.2f} req/s per instance at the mean request "
        f"({prompt} + {output} tokens), swap {swap_s:.2f}s"
    )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="placement-") as directory:
        path = Path(directory) / "workload.jsonl"
        write_workload(path, requests)
        for variant in args.variants.split(","):
            with EmulatorProcess(instances(), speedup=speedup, extra={"lengths": str(path)}) as fleet:
                config = proxy_config(fleet, variant, layout, capacity, swap_s, speedup)
                with ProxyProcess(config) as proxy:
                    _, records = asyncio.run(
                        replay_run(requests, proxy.url, workload=str(path), label=variant, speedup=speedup)
                    )
                    metrics = asyncio.run(_swaps(proxy.url))
                    if args.verbose:
                        for line in proxy.output().splitlines():
                            if "swapping" in line or "waking" in line or "placement adopted" in line:
                                print("   ", line[11:200])
            phases = [
                attainment([r for r in records if r.id.startswith(f"p{i}-")], classes) for i in range(len(PHASES))
            ]
            statuses = dict(Counter(r.status for r in records))
            if args.verbose:
                for (status, error), n in Counter((r.status, (r.error or "")[:100]) for r in records).most_common(8):
                    print(f"  {n:5d} {status} {error}")
            rows[variant] = {
                "slo_attainment": attainment(records, classes),
                "phases": phases,
                "statuses": statuses,
                "swaps": metrics,
            }
            print(
                f"{variant:10s} SLO {100 * rows[variant]['slo_attainment']:5.1f}%  phases "
                + " ".join(f"{100 * p:5.1f}%" for p in phases)
                + f"  {statuses}  swaps {metrics}",
                flush=True,
            )
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"speedup": speedup, "phase_s": args.phase_s, "rate": args.rate, "layout": layout, "results": rows}
    (OUT / "placement.json").write_text(json.dumps(summary, indent=1))


async def _swaps(url: str) -> dict[str, float]:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sloproxy_swaps_total" and sample.value:
                out[sample.labels["outcome"]] = sample.value
            if sample.name == "sloproxy_placement_outcomes_total" and sample.labels["outcome"] == "adopted":
                out["placements"] = sample.value
    return out


if __name__ == "__main__":
    main()
