"""SLO capacity per policy: simulate one workload at several rate scales and find where attainment breaks.

A scale ``s`` replays the same requests with arrivals at ``arrival_s / s`` (``s`` times the rate).
A policy's SLO capacity is the highest scale up to which overall attainment stays at or above the
target (90%, EVALUATION.md): the first scale that misses it bounds the capacity even if a higher one
happens to meet it again. ``NAME+oracle`` runs policy NAME with the true reply lengths as estimates.
The baselines round-robin and least-load always run, because capacity is reported as a ratio to them.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import LoadPolling, ProxyConfig
from ..emulator.fleet import FleetSpec
from .report import summarize
from .simprep import SimRequest
from .simulate import simulate

TARGET = 0.90
BASELINES = ("round-robin", "least-load")
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
ORACLE_SUFFIX = "+oracle"


@dataclass(frozen=True, slots=True)
class PolicyRun:
    """A policy as the sweep names it: ``edf`` or ``edf+oracle``."""

    label: str
    policy: str
    oracle: bool


def parse_policies(text: str) -> list[PolicyRun]:
    """``A,B+oracle,...``; the baselines are added when missing. Names are checked by loading them."""
    from ..plugins import load_policy

    runs: list[PolicyRun] = []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        policy = label.removesuffix(ORACLE_SUFFIX)
        load_policy(policy)  # ValueError naming the known policies
        if label not in {r.label for r in runs}:
            runs.append(PolicyRun(label, policy, label.endswith(ORACLE_SUFFIX)))
    if not runs:
        raise ValueError("--policies: at least one policy name")
    missing = [PolicyRun(name, name, False) for name in BASELINES if name not in {r.label for r in runs}]
    return missing + runs


def parse_scales(text: str) -> list[float]:
    try:
        scales = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--scales: expected numbers, got {text!r}") from None
    if not scales or scales[0] <= 0:
        raise ValueError("--scales: positive numbers, at least one")
    return scales


def capacity(attainment: dict[float, float], target: float = TARGET) -> float | None:
    """The highest scale up to which attainment stays >= target; None if the lowest already misses."""
    best = None
    for scale in sorted(attainment):
        if attainment[scale] < target:
            break
        best = scale
    return best


def scale_key(scale: float) -> str:
    return f"{scale:g}"


# Worker processes inherit the inputs by fork instead of pickling 100 MB of prompts per task.
_INPUTS: dict[str, Any] = {}


def _one(task: tuple[PolicyRun, float, float]) -> tuple[str, float, dict[str, Any]]:
    run, scale, phase = task
    meta, records = simulate(
        _INPUTS["fleet"],
        _INPUTS["requests"],
        run.policy,
        oracle=run.oracle,
        scale=scale,
        base=_INPUTS["base"],
        timeout_s=_INPUTS["timeout_s"],
        poll_phase_s=phase,
        label=run.label,
    )
    return run.label, scale, summarize(meta, records)["overall"]


def sweep(
    fleet: FleetSpec,
    requests: Sequence[SimRequest],
    runs: Sequence[PolicyRun],
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    base: ProxyConfig | None = None,
    timeout_s: float = 600.0,
    jobs: int = 1,
    phases: int = 1,
    progress: Any = None,
) -> dict[str, Any]:
    """``{"capacity": {label: scale or None}, "attainment": {label: {scale: value}}, "overall": ...}``.

    With ``phases`` > 1 each point is the mean attainment over that many load-polling phases spread
    over one polling interval (the phase is arbitrary live, and budgets adapt to the readings).
    """
    if jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if phases < 1:
        raise ValueError("--phases must be at least 1")
    interval = (base.load_polling.interval_s if base is not None else LoadPolling().interval_s) / phases
    _INPUTS.update(fleet=fleet, requests=requests, base=base, timeout_s=timeout_s)
    tasks = [(run, scale, index * interval) for run in runs for scale in scales for index in range(phases)]
    results: list[tuple[str, float, dict[str, Any]]] = []
    try:
        if jobs == 1:
            for task in tasks:
                results.append(_one(task))
                if progress is not None:
                    progress(results[-1])
        else:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                for result in pool.imap_unordered(_one, tasks):
                    results.append(result)
                    if progress is not None:
                        progress(result)
    finally:
        _INPUTS.clear()
    attainment: dict[str, dict[float, float]] = {run.label: {} for run in runs}
    overall: dict[str, dict[float, list[dict[str, Any]]]] = {run.label: {} for run in runs}
    for label, scale, summary in results:
        overall[label].setdefault(scale, []).append(summary)
    for label, by_scale in overall.items():
        for scale, summaries in by_scale.items():
            attainment[label][scale] = sum(s["slo_attainment"] or 0.0 for s in summaries) / len(summaries)
    for label in attainment:
        attainment[label] = dict(sorted(attainment[label].items()))
    return {
        "capacity": {label: capacity(values) for label, values in attainment.items()},
        "attainment": attainment,
        "overall": overall,
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: capacity and attainment per policy, scales as strings."""
    return {
        "capacity": result["capacity"],
        "attainment": {
            label: {scale_key(s): round(v, 6) for s, v in values.items()}
            for label, values in result["attainment"].items()
        },
    }


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "n/a"
    return f"{value / baseline:.2f}x"


def render_table(result: dict[str, Any]) -> str:
    """Attainment per policy and scale, capacity, and capacity as a ratio to each baseline."""
    attainment, capacities = result["attainment"], result["capacity"]
    scales = sorted({s for values in attainment.values() for s in values})
    top = scales[-1] if scales else None
    header = ["policy", *(f"x{scale_key(s)}" for s in scales), "capacity", *(f"vs {b}" for b in BASELINES)]
    rows = [header]
    for label, values in attainment.items():
        cap = capacities[label]
        shown = "none" if cap is None else (f">={scale_key(cap)}" if cap == top else scale_key(cap))
        rows.append(
            [
                label,
                *(f"{100 * values[s]:.1f}%" if s in values else "-" for s in scales),
                shown,
                *(ratio(cap, capacities.get(b)) for b in BASELINES),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (
        "\n".join(lines) + f"\n(capacity: the highest scale up to which overall SLO attainment stays >= {TARGET:.0%})"
    )


def figure_png(result: dict[str, Any], title: str = "") -> bytes:
    """Overall attainment vs rate scale, one line per policy, and the target line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, values in result["attainment"].items():
        scales = sorted(values)
        style = "--" if label.endswith(ORACLE_SUFFIX) else "-"
        axes.plot(scales, [100 * values[s] for s in scales], style, marker="o", label=label)
    axes.axhline(100 * TARGET, color="grey", linestyle=":", label=f"{TARGET:.0%} target")
    axes.set_xlabel("rate scale (x the trace's request rate)")
    axes.set_ylabel("overall SLO attainment (%)")
    axes.set_ylim(0, 101)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
