"""The second half of ``make demo``: a few minutes of a real trace through the proxy, per policy.

For each policy, a fresh emulated fleet (empty caches, true reply lengths from the workload) and a
fresh proxy in front of it; the workload is replayed open-loop at a speedup, and the runs are
reported side by side (SLO attainment per class, latency percentiles) with a figure and an HTML
page. The proxy's durations are divided by the speedup so it behaves as it would in real time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from .emulator.fleet import FleetSpec, InstanceSpec
from .evaluation.agreement import base_config, scaled_config
from .evaluation.build import BuildOptions, build_workload, parse_models
from .evaluation.records import RequestRecord, RunMeta, fleet_record, write_run
from .evaluation.replay import replay_run
from .evaluation.report import figure_png, render_html, render_text, summarize
from .evaluation.simulate import proxy_config
from .evaluation.workload import write_workload
from .processes import EmulatorProcess, ProxyProcess, free_port

# Fleet model -> the AlpacaEval generator whose real reply lengths it gets.
GENERATORS = {"llama-3-8b": "Meta-Llama-3-8B-Instruct", "qwen-7b": "Qwen1.5-7B-Chat"}


def find_data_dir() -> Path | None:
    """The shared traces and lengths: ``$SLOPROXY_DATA``, or ``shared/data`` beside the checkout."""
    candidates = [os.environ.get("SLOPROXY_DATA"), Path.cwd().parent / "shared" / "data"]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for candidate in candidates:
        if candidate and (Path(candidate) / "traces").is_dir() and (Path(candidate) / "lengths").is_dir():
            return Path(candidate)
    return None


async def replay_policies(
    specs: Sequence[InstanceSpec],
    data: Path,
    out_dir: Path,
    *,
    policies: Sequence[str],
    seconds: float,
    speedup: float,
    rate_scale: float = 1.0,
) -> list[dict]:
    """Replay ``seconds`` of the Azure conversation trace through each policy; returns the summaries."""
    models = sorted({s.model for s in specs})
    workload = build_workload(
        BuildOptions(
            trace=str(data / "traces" / "azure_conv_2023.csv"),
            lengths_dir=str(data / "lengths"),
            models=parse_models(",".join(f"{m}={GENERATORS.get(m, 'Meta-Llama-3-8B-Instruct')}" for m in models)),
            duration_s=seconds,
            rate_scale=rate_scale,  # prompts as long as the trace says: the proxy places each where it fits
            seed=1,
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    workload_path = out_dir / "demo-workload.jsonl"
    write_workload(workload_path, workload)
    print(
        f"\nreplaying {seconds:g} s of the Azure conversation trace ({len(workload)} requests, 60% interactive / "
        f"40% batch, rate x{rate_scale:g}) at speedup {speedup:g}, once per policy: {', '.join(policies)}"
    )
    runs: list[tuple[RunMeta, list[RequestRecord]]] = []
    for policy in policies:
        run_specs = [msgspec.structs.replace(s, port=free_port()) for s in specs]
        instances = [msgspec.structs.asdict(s) for s in run_specs]
        with EmulatorProcess(instances, speedup=speedup, extra={"lengths": str(workload_path)}):
            fleet = FleetSpec(instances=run_specs)
            config = scaled_config(proxy_config(fleet, policy, base=base_config()), speedup)
            with ProxyProcess(msgspec.to_builtins(config)) as proxy:
                meta, records = await replay_run(
                    workload, proxy.url, workload=str(workload_path), label=policy, speedup=speedup
                )
        # what the report states about the run (the replayer only knows the workload and the URL)
        meta.trace, meta.window_s, meta.fleet = "azure_conv_2023.csv", [0.0, seconds], fleet_record(specs)
        meta.extra.update(policy=policy, rate_scale=rate_scale)
        write_run(out_dir / f"demo-run-{policy}.jsonl", meta, records)
        runs.append((meta, records))
        ok = sum(r.status == "ok" for r in records)
        print(f"  {policy:14} {ok}/{len(records)} answered")
    summaries = [summarize(meta, records) for meta, records in runs]
    print()
    print(render_text(summaries))
    png = figure_png(runs, summaries)
    (out_dir / "demo-report.png").write_bytes(png)
    sources = [str(out_dir / f"demo-run-{p}.jsonl") for p in policies]
    (out_dir / "demo-report.html").write_text(render_html(summaries, png, sources), encoding="utf-8")
    print(f"\nfigure: {out_dir / 'demo-report.png'}   report: {out_dir / 'demo-report.html'}")
    print(f"again, or with other policies: sloproxy report {' '.join(sources)}")
    return summaries
