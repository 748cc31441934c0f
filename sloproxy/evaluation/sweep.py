"""SLO capacity per policy: simulate one workload at several rate scales and find where attainment breaks.

A scale ``s`` replays the same requests with arrivals at ``arrival_s / s`` (``s`` times the rate).
A policy's SLO capacity is the highest measured scale up to which overall attainment stays at or above
the target (90%, EVALUATION.md): a measured scale that misses it bounds the capacity even if a higher one
happens to meet it again. ``NAME+oracle`` runs policy NAME with the true reply lengths as estimates,
``NAME+median`` with only each model's median reply (the predictor's prior, never refined from the prompt).
The baselines round-robin and least-load always run, because capacity is reported as a ratio to them.

Two ways to choose the scales: :func:`sweep` evaluates a fixed grid (``--scales``); :func:`search` finds
each policy's capacity itself. It starts at scale 1, doubles (or halves) until attainment crosses the
target, within 1/64..64, then splits the bracket in log space until its ends are within the resolution
(5% by default) of each other; every scale it evaluated is kept as the policy's curve.
"""

from __future__ import annotations

import io
import math
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
LENGTH_SUFFIXES = {ORACLE_SUFFIX: "oracle", "+median": "median"}  # a label's suffix -> what the proxy knows
SEARCH_START = 1.0
SEARCH_BOUNDS = (1 / 64, 64.0)  # the search doubles / halves from SEARCH_START at most six times
DEFAULT_RESOLUTION = 0.05  # the search stops when capacity and first miss are within 5% of each other


@dataclass(frozen=True, slots=True)
class PolicyRun:
    """A policy as the sweep names it: ``edf``, ``edf+median`` or ``edf+oracle``."""

    label: str
    policy: str
    lengths: str = "predicted"  # simulate.LENGTHS


def split_label(label: str) -> tuple[str, str]:
    """``edf+oracle`` -> ``("edf", "oracle")``; a label without a length suffix runs with the predictor."""
    for suffix, lengths in LENGTH_SUFFIXES.items():
        if label.endswith(suffix):
            return label.removesuffix(suffix), lengths
    return label, "predicted"


def parse_policies(text: str) -> list[PolicyRun]:
    """``A,B+oracle,C+median,...``; the baselines are added when missing. Names are checked by loading them."""
    from ..plugins import load_policy

    runs: list[PolicyRun] = []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        policy, lengths = split_label(label)
        load_policy(policy)  # ValueError naming the known policies
        if label not in {r.label for r in runs}:
            runs.append(PolicyRun(label, policy, lengths))
    if not runs:
        raise ValueError("--policies: at least one policy name")
    missing = [PolicyRun(name, name) for name in BASELINES if name not in {r.label for r in runs}]
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
        lengths=run.lengths,
        scale=scale,
        base=_INPUTS["base"],
        timeout_s=_INPUTS["timeout_s"],
        poll_phase_s=phase,
        label=run.label,
    )
    return run.label, scale, summarize(meta, records)["overall"]


class _Evaluator:
    """Measures (policy, scale) points, each the mean over ``phases`` load-polling phases; with ``jobs`` > 1
    on one forked pool kept for every batch (a search measures in rounds)."""

    def __init__(
        self,
        fleet: FleetSpec,
        requests: Sequence[SimRequest],
        runs: Sequence[PolicyRun],
        *,
        base: ProxyConfig | None,
        timeout_s: float,
        jobs: int,
        phases: int,
        progress: Any,
    ) -> None:
        if jobs < 1:
            raise ValueError("--jobs must be at least 1")
        if phases < 1:
            raise ValueError("--phases must be at least 1")
        self.inputs = {"fleet": fleet, "requests": requests, "base": base, "timeout_s": timeout_s}
        self.jobs, self.phases, self.progress = jobs, phases, progress
        self.interval = (base.load_polling.interval_s if base is not None else LoadPolling().interval_s) / phases
        self.attainment: dict[str, dict[float, float]] = {run.label: {} for run in runs}
        self.overall: dict[str, dict[float, list[dict[str, Any]]]] = {run.label: {} for run in runs}
        self._pool: Any = None

    def __enter__(self) -> _Evaluator:
        _INPUTS.update(self.inputs)
        if self.jobs > 1:
            self._pool = multiprocessing.get_context("fork").Pool(self.jobs)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
        finally:
            _INPUTS.clear()

    def measure(self, points: Sequence[tuple[PolicyRun, float]]) -> None:
        tasks = [(run, scale, index * self.interval) for run, scale in points for index in range(self.phases)]
        results = map(_one, tasks) if self._pool is None else self._pool.imap_unordered(_one, tasks)
        touched: set[tuple[str, float]] = set()
        for label, scale, summary in results:
            self.overall[label].setdefault(scale, []).append(summary)
            touched.add((label, scale))
            if self.progress is not None:
                self.progress((label, scale, summary))
        for label, scale in touched:
            summaries = self.overall[label][scale]
            self.attainment[label][scale] = sum(s["slo_attainment"] or 0.0 for s in summaries) / len(summaries)
            self.attainment[label] = dict(sorted(self.attainment[label].items()))


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
    """A fixed grid: ``{"capacity": {label: scale or None}, "attainment": {label: {scale: value}}, "overall": ...}``.

    With ``phases`` > 1 each point is the mean attainment over that many load-polling phases spread
    over one polling interval (the phase is arbitrary live, and budgets adapt to the readings).
    """
    evaluator = _Evaluator(
        fleet, requests, runs, base=base, timeout_s=timeout_s, jobs=jobs, phases=phases, progress=progress
    )
    with evaluator:
        evaluator.measure([(run, scale) for run in runs for scale in scales])
    return {
        "capacity": {label: capacity(values) for label, values in evaluator.attainment.items()},
        "attainment": evaluator.attainment,
        "overall": evaluator.overall,
    }


def bracket(attainment: dict[float, float], target: float = TARGET) -> tuple[float | None, float | None]:
    """``(capacity, first miss)``: the capacity as :func:`capacity` has it and the lowest measured scale
    above it (the one that missed). ``(None, lowest)`` when the lowest misses; ``(highest, None)`` when
    nothing measured misses."""
    low = capacity(attainment, target)
    above = [scale for scale in attainment if low is None or scale > low]
    return low, min(above, default=None)


def _round_inside(value: float, low: float, high: float) -> float:
    """``value`` to 4 significant digits (readable scales), unless that leaves the open interval."""
    rounded = float(f"{value:.4g}")
    return rounded if low < rounded < high else value


def next_scales(
    attainment: dict[float, float],
    resolution: float = DEFAULT_RESOLUTION,
    *,
    count: int = 1,
    target: float = TARGET,
    start: float = SEARCH_START,
    bounds: tuple[float, float] = SEARCH_BOUNDS,
) -> list[float]:
    """The next (up to ``count``) scales a capacity search measures, given the points measured so far; [] when done.

    Nothing measured: ``start``. Every measured scale meets the target: double above the highest (up to the
    upper bound); the lowest misses: halve below it (down to the lower bound). Otherwise split the bracket
    (:func:`bracket`) geometrically into ``count`` + 1 parts until its ratio is at most 1 + ``resolution``.
    With ``count`` 1 this is bisection, and the measured points never contradict each other (every pass lies
    below every miss); with more points per round a pass above a miss can appear, and the miss bounds.
    """
    floor, ceiling = bounds
    measured = set(attainment)
    if not attainment:
        return [start]
    low, high = bracket(attainment, target)
    if low is None:
        assert high is not None
        candidates = [max(floor, high / 2**step) for step in range(1, count + 1)] if high > floor else []
    elif high is None:
        candidates = [min(ceiling, low * 2**step) for step in range(1, count + 1)] if low < ceiling else []
    else:
        ratio = high / low
        if ratio <= 1 + resolution:
            return []
        needed = max(1, math.ceil(math.log(ratio) / math.log(1 + resolution)) - 1)
        parts = min(count, needed) + 1
        candidates = [_round_inside(low * ratio ** (step / parts), low, high) for step in range(1, parts)]
    return sorted({scale for scale in candidates if scale not in measured})


def check_resolution(resolution: float) -> float:
    if not 0.001 <= resolution < 1:
        raise ValueError(f"--resolution: a fraction from 0.001 to below 1 (0.05: within 5%), got {resolution:g}")
    return resolution


def search(
    fleet: FleetSpec,
    requests: Sequence[SimRequest],
    runs: Sequence[PolicyRun],
    *,
    resolution: float = DEFAULT_RESOLUTION,
    start: float = SEARCH_START,
    bounds: tuple[float, float] = SEARCH_BOUNDS,
    base: ProxyConfig | None = None,
    timeout_s: float = 600.0,
    jobs: int = 1,
    phases: int = 1,
    progress: Any = None,
) -> dict[str, Any]:
    """Find each policy's capacity to within ``resolution``: as :func:`sweep`'s result, plus
    ``"bracket": {label: (capacity or None, first miss or None)}``, ``"resolution"``, ``"start"`` and ``"bounds"``.

    The policies search side by side in rounds: each round measures every unfinished policy's next scales
    (all their phases) at once, so ``jobs`` workers stay busy across policies; workers left over in a
    round (``jobs`` > policies x phases) measure more scales per policy (k-section instead of bisection).
    """
    check_resolution(resolution)
    floor, ceiling = bounds
    if not 0 < floor <= start <= ceiling:
        raise ValueError(f"search bounds {floor:g}..{ceiling:g} must be positive and contain the start {start:g}")
    evaluator = _Evaluator(
        fleet, requests, runs, base=base, timeout_s=timeout_s, jobs=jobs, phases=phases, progress=progress
    )

    def plan(run: PolicyRun, count: int) -> list[float]:
        return next_scales(evaluator.attainment[run.label], resolution, count=count, start=start, bounds=bounds)

    with evaluator:
        while active := [run for run in runs if plan(run, 1)]:
            count = max(1, jobs // (len(active) * phases))
            evaluator.measure([(run, scale) for run in active for scale in plan(run, count)])
    attainment = evaluator.attainment
    return {
        "capacity": {label: capacity(values) for label, values in attainment.items()},
        "bracket": {label: bracket(values) for label, values in attainment.items()},
        "attainment": attainment,
        "overall": evaluator.overall,
        "resolution": resolution,
        "start": start,
        "bounds": bounds,
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: capacity and attainment per policy, scales as strings; a search adds each
    policy's ``bracket`` ``[capacity, first miss]`` (null for an end the search bounds did not reach) and
    its ``resolution``."""
    out: dict[str, Any] = {"capacity": result["capacity"]}
    if "bracket" in result:
        out["bracket"] = {label: list(pair) for label, pair in result["bracket"].items()}
    out["attainment"] = {
        label: {scale_key(s): round(v, 6) for s, v in values.items()} for label, values in result["attainment"].items()
    }
    if "resolution" in result:
        out["resolution"] = result["resolution"]
    return out


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "n/a"
    return f"{value / baseline:.2f}x"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_table(result: dict[str, Any]) -> str:
    """Attainment per policy and scale, capacity, and capacity as a ratio to each baseline; for a
    search, capacity with its bracket per policy and then each policy's curve."""
    if "bracket" in result:
        return _render_search(result)
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
    return (
        "\n".join(_columns(rows))
        + f"\n(capacity: the highest scale up to which overall SLO attainment stays >= {TARGET:.0%})"
    )


def _render_search(result: dict[str, Any]) -> str:
    attainment, capacities, brackets = result["attainment"], result["capacity"], result["bracket"]
    rows = [["policy", "capacity", "bracket", *(f"vs {b}" for b in BASELINES), "scales run"]]
    for label, values in attainment.items():
        low, high = brackets[label]
        if low is None:
            shown, span = f"<{scale_key(high)}", f"[?, {scale_key(high)})"
        elif high is None:
            shown, span = f">={scale_key(low)}", f"[{scale_key(low)}, ?)"
        else:
            shown, span = scale_key(low), f"[{scale_key(low)}, {scale_key(high)})"
        ratios = [ratio(capacities[label], capacities.get(b)) for b in BASELINES]
        rows.append([label, shown, span, *ratios, str(len(values))])
    width = max(len(label) for label in attainment)
    curves = [
        f"  {label.ljust(width)}  " + "  ".join(f"x{scale_key(s)} {100 * v:.1f}%" for s, v in sorted(values.items()))
        for label, values in attainment.items()
    ]
    floor, ceiling = (f"1/{1 / b:g}" if b < 1 and (1 / b).is_integer() else f"{b:g}" for b in result["bounds"])
    return "\n".join(
        [
            *_columns(rows),
            f"(capacity: the highest scale run with overall SLO attainment >= {TARGET:.0%} and none below it missing;",
            f" bracket: [capacity, the lowest scale run above it, which misses), within {result['resolution']:.0%};"
            f" searched from x{result['start']:g} within {floor}..{ceiling})",
            "",
            "overall SLO attainment at every scale run:",
            *curves,
        ]
    )


def figure_png(result: dict[str, Any], title: str = "") -> bytes:
    """Overall attainment vs rate scale, one line per policy, and the target line (a search: log scale,
    a star at each policy's capacity)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    searched = "bracket" in result
    for label, values in result["attainment"].items():
        scales = sorted(values)
        style = "--" if label.endswith(tuple(LENGTH_SUFFIXES)) else "-"
        (line,) = axes.plot(scales, [100 * values[s] for s in scales], style, marker="o", label=label)
        cap = result["capacity"][label]
        if searched and cap is not None:  # a search's scales span decades: mark where each policy's capacity is
            axes.plot([cap], [100 * values[cap]], "*", color=line.get_color(), markersize=13)
    if searched:
        from matplotlib.ticker import FuncFormatter

        axes.plot([], [], "*", color="grey", markersize=10, label="capacity")
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
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
