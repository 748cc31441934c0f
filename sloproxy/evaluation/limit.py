"""A fleet's throughput limit on a workload: the highest rate scale it sustains at all, deadlines aside.

SLO capacity (``sweep.py``) says how much load a policy serves *within the SLOs*; this says how much the
fleet can serve at all, so that each capacity can be read as a share of what was possible (EVALUATION.md's
"how close to the limit"). The limit is measured by simulation with a scheduler that knows every reply's
true length and has no deadline to meet (every SLO class's deadline pushed out of reach, so nothing is
refused for being late, and no client timeout). By default that scheduler is least-load: a queued policy
without deadlines holds work in its queue at its budgets and reads lower (``slo`` came out 15-40% under
least-load on the bench's fleets). On KV-bound fleets least-load's queues grow gradually rather than at a
knee, so its limit can read below what a deadline-aware policy serves within the SLOs; a demonstrated SLO
capacity is itself a sustained rate, so ``bench/policy_spread.py`` reads the limit as the higher of the two.

A scale is *sustained* when every request completes (no refusal, no timeout; a client error such as a
prompt longer than every window is the request's fault and not counted) and the queues stay bounded: the
median time to first token of the last third of the arrivals is at most ``ttft_bound_s``. Above the limit
a queue grows for as long as requests keep arriving, so that median grows with the trace's length (hundreds
of seconds on a ten-minute window) while below it it stays near the prefill time; the limit therefore
hardly depends on the bound where the knee is sharp (each scale's tail TTFT is returned, so that can be
checked: docs/evaluation.md gives one case). The scale is found by the
sweep's bisection (:func:`sweep.next_scales`) to within ``resolution``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import msgspec

from ..config import ProxyConfig
from ..emulator.fleet import FleetSpec
from ..slo import DEFAULT_CLASSES, SLOClass
from .records import RequestRecord
from .simprep import SimRequest
from .simulate import simulate
from .sweep import DEFAULT_RESOLUTION, bracket, check_resolution, next_scales

LIMIT_POLICIES = ("least-load",)
DEFAULT_TTFT_BOUND_S = 10.0
NO_TIMEOUT_S = 1e9  # a client that waits for ever: the limit is about throughput, not patience


def last_third_ttft(records: Sequence[RequestRecord]) -> float | None:
    """Median TTFT of the last third of the arrivals that completed (None when none did)."""
    ordered = sorted(records, key=lambda r: r.arrival_s)
    tail = [r.ttft_s for r in ordered[len(ordered) * 2 // 3 :] if r.status == "ok" and r.ttft_s is not None]
    return statistics.median(tail) if tail else None


def sustained(records: Sequence[RequestRecord], ttft_bound_s: float = DEFAULT_TTFT_BOUND_S) -> bool:
    """Every request served (client errors aside) and the last third's median TTFT within the bound."""
    served = all(r.status == "ok" or (r.http_status is not None and 400 <= r.http_status < 429) for r in records)
    tail = last_third_ttft(records)
    return served and tail is not None and tail <= ttft_bound_s


def patient_config(requests: Sequence[SimRequest]) -> ProxyConfig:
    """A proxy config whose classes (the workload's, bands as the default classes have them) have no
    deadline within reach: only whether the work gets done counts."""
    bands = {c.name: c.band for c in DEFAULT_CLASSES}
    classes = [
        SLOClass(name, deadline_s=NO_TIMEOUT_S, band=bands.get(name, 1))
        for name in sorted({r.slo_class for r in requests})
    ]
    return msgspec.structs.replace(ProxyConfig(backends=[]), slo_classes=classes)


def run_patient(fleet: FleetSpec, requests: Sequence[SimRequest], policy: str, scale: float) -> list[RequestRecord]:
    """One simulation of ``policy`` with true lengths, no deadlines and no client timeout."""
    config = patient_config(requests)
    _, records = simulate(fleet, requests, policy, base=config, lengths="oracle", scale=scale, timeout_s=NO_TIMEOUT_S)
    return records


def throughput_limit(
    fleet: FleetSpec,
    requests: Sequence[SimRequest],
    *,
    resolution: float = DEFAULT_RESOLUTION,
    ttft_bound_s: float = DEFAULT_TTFT_BOUND_S,
    start: float = 1.0,
) -> dict[str, Any]:
    """``{"limit": scale or None, "by_policy": {policy: {"bracket": (sustained, first not sustained),
    "tail_ttft_s": {scale: s}}}}``.

    Per policy of :data:`LIMIT_POLICIES`, the highest scale found sustained with none below it failing
    (``None`` when even the lowest scale tried, 1/64, is not); ``limit`` is the highest of them.
    ``tail_ttft_s`` is the last third's median TTFT at every scale run (None where nothing completed),
    so the bound's influence can be judged.
    """
    check_resolution(resolution)
    by_policy: dict[str, dict[str, Any]] = {}
    for policy in LIMIT_POLICIES:
        verdict: dict[float, float] = {}  # 1.0 sustained, 0.0 not: the sweep's bisection with a 0.5 target
        tails: dict[float, float | None] = {}
        while scales := next_scales(verdict, resolution, target=0.5, start=start):
            for scale in scales:
                records = run_patient(fleet, requests, policy, scale)
                verdict[scale] = 1.0 if sustained(records, ttft_bound_s) else 0.0
                tails[scale] = last_third_ttft(records)
        by_policy[policy] = {"bracket": bracket(verdict, 0.5), "tail_ttft_s": dict(sorted(tails.items()))}
    found = [entry["bracket"][0] for entry in by_policy.values() if entry["bracket"][0] is not None]
    return {"limit": max(found, default=None), "by_policy": by_policy}
