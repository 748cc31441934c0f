"""Demand per (model, region) per planning interval, measured from a workload, and its forecast.

Measure: for each interval, the peak over sliding windows of ``window_s`` of the arrival rate (requests/s)
and of the output-token rate (the replies' true lengths), plus the interval's mean prompt and reply length.
The peak of a one-minute window, not the interval's mean, because the SLO is lost in the busiest minute:
an hour's mean hides the bursts (Azure code's per-minute rate peaks at 4x its mean).

Forecast, two documented methods:

* ``seasonal`` (default): seasonal-naive with the workload's span as the period. The workload is
  yesterday's (or last week's) trace and interval t of the plan gets interval t's measured demand. Daily
  seasonality dominates LLM traffic, and the naive seasonal forecast is the standard baseline it is hard to
  beat without more history than one trace holds.
* ``ewma``: one step ahead from the intervals before: f(t) = a x(t-1) + (1 - a) f(t-1), and never below
  x(t-1) (a reactive planner must not shrink into a rise it has just seen). It needs a warm start:
  f(0) = x(0), i.e. the first interval is taken as known.

A request's region is its ``region`` field when the workload has one, else ``default``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

DEFAULT_REGION = "default"
FORECASTS = ("seasonal", "ewma")


class DemandRecord(msgspec.Struct, frozen=True):
    """The fields of a workload line the planner needs (unknown fields are ignored)."""

    arrival_s: float
    model: str
    prompt_tokens: int
    output_tokens: int
    region: str | None = None
    slo_class: str | None = None


class IntervalDemand(msgspec.Struct, kw_only=True):
    """One (model, region)'s demand in one interval; rates are sliding-window peaks."""

    model: str
    region: str
    interval: int
    start_s: float
    requests: int
    rps: float
    output_tps: float
    mean_prompt_tokens: float
    mean_output_tokens: float


def read_demand(path: str | Path) -> list[DemandRecord]:
    """Workload lines (JSONL) as demand records, in arrival order; a bad line is a ValueError naming it."""
    decoder = msgspec.json.Decoder(DemandRecord)
    records: list[DemandRecord] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(decoder.decode(line))
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a workload request ({exc})") from None
    if not records:
        raise ValueError(f"{path}: no requests")
    return sorted(records, key=lambda r: r.arrival_s)


def peak_window_rate(times: Sequence[float], weights: Sequence[float], window_s: float) -> float:
    """Max over windows [t, t + window_s) starting at an arrival of (sum of weights inside) / window_s."""
    best = 0.0
    total = 0.0
    left = 0
    for right, t in enumerate(times):
        total += weights[right]
        while times[left] <= t - window_s:
            total -= weights[left]
            left += 1
        best = max(best, total)
    return best / window_s


def measure_demand(
    records: Iterable[DemandRecord], interval_s: float, window_s: float = 60.0
) -> dict[tuple[str, str], list[IntervalDemand]]:
    """Per (model, region), one entry per interval from the workload's start to its last arrival
    (intervals without requests get zero demand)."""
    if interval_s <= 0 or window_s <= 0:
        raise ValueError("interval and window must be positive")
    records = list(records)
    if not records:
        return {}
    start = min(r.arrival_s for r in records)
    count = max(1, math.floor((max(r.arrival_s for r in records) - start) / interval_s) + 1)
    window = min(window_s, interval_s)
    grouped: dict[tuple[str, str], list[list[DemandRecord]]] = {}
    for record in records:
        key = (record.model, record.region or DEFAULT_REGION)
        slots = grouped.setdefault(key, [[] for _ in range(count)])
        slots[min(int((record.arrival_s - start) // interval_s), count - 1)].append(record)
    demand: dict[tuple[str, str], list[IntervalDemand]] = {}
    for (model, region), slots in sorted(grouped.items()):
        rows: list[IntervalDemand] = []
        for index, slot in enumerate(slots):
            times = [r.arrival_s for r in slot]
            n = len(slot)
            rows.append(
                IntervalDemand(
                    model=model,
                    region=region,
                    interval=index,
                    start_s=start + index * interval_s,
                    requests=n,
                    rps=peak_window_rate(times, [1.0] * n, window),
                    output_tps=peak_window_rate(times, [float(r.output_tokens) for r in slot], window),
                    mean_prompt_tokens=sum(r.prompt_tokens for r in slot) / n if n else 0.0,
                    mean_output_tokens=sum(r.output_tokens for r in slot) / n if n else 0.0,
                )
            )
        demand[(model, region)] = rows
    return demand


def forecast(
    measured: dict[tuple[str, str], list[IntervalDemand]], method: str = "seasonal", alpha: float = 0.5
) -> dict[tuple[str, str], list[IntervalDemand]]:
    """The demand to plan for, per interval (see the module docstring for the methods)."""
    if method == "seasonal":
        return {key: [msgspec.structs.replace(row) for row in rows] for key, rows in measured.items()}
    if method != "ewma":
        raise ValueError(f"unknown forecast {method!r} (known: {', '.join(FORECASTS)})")
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    fields = ("rps", "output_tps", "mean_prompt_tokens", "mean_output_tokens")
    out: dict[tuple[str, str], list[IntervalDemand]] = {}
    for key, rows in measured.items():
        level = {f: getattr(rows[0], f) for f in fields}
        planned = [msgspec.structs.replace(rows[0])]
        for previous, row in itertools.pairwise(rows):
            seen = {f: getattr(previous, f) for f in fields}
            if not previous.requests:  # no requests: the lengths say nothing, keep their level
                seen.update(
                    mean_prompt_tokens=level["mean_prompt_tokens"], mean_output_tokens=level["mean_output_tokens"]
                )
            level = {f: alpha * seen[f] + (1 - alpha) * level[f] for f in fields}
            values = {f: max(level[f], seen[f]) for f in fields}
            planned.append(msgspec.structs.replace(row, requests=previous.requests, **values))
        out[key] = planned
    return out
