"""Calibrate a profile's SLO capacity by simulation on the workload's own requests (a derating factor).

Why: the profile's capacity is a closed loop of equal prompts and 128-token replies at its SLO
concurrency. Real traffic differs in ways that model cannot see: open-loop bursts shorter than the
demand window, a prompt-length tail, and short replies whose TPOT is spent almost wholly inside other
requests' prefill chunks (a 70B's 8k-token chunk is a ~0.5 s step: four of them in a 5-token reply miss
TPOT 0.1 s). On the Azure code trace the profile overstates the 70B's capacity 2-3x.

Method, per (model, GPU type): for each calibration interval i, ``needed[i]`` is the number of instances
the profile's model says the interval needs (fractional, no headroom: ``Planner.needed_instances``), and
``smallest[i]`` the fewest instances of that type alone whose simulation of the interval's requests meets
the attainment target (found by doubling then bisection: attainment rises with instances). The factor is
``min_i needed[i] / (smallest[i] - 0.5)``, over intervals needing more than one instance (one instance
says only that the floor, ``min_instances``, suffices; the half is the midpoint of the continuous needs
that round up to ``smallest[i]``). The planner multiplies the profile's capacity by it, so each
calibration interval, planned alone without headroom, gets at least ``smallest[i]`` instances:
ceil(needed[i] / factor) >= smallest[i]. The factor may exceed 1 (the profile was pessimistic).

It is fitted on some intervals and should be judged on others (``bench/planner.py`` holds out the odd
ones): one number per (model, GPU type), not a per-interval answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from ..evaluation.records import RequestRecord, default_slo_classes, slo_met
from ..evaluation.simprep import SimRequest
from .forecast import IntervalDemand
from .planner import Planner
from .profile import Calibration, InstanceProfile, SloTarget

Attainment = Callable[[int], float]  # instances -> attainment of the interval's requests on that many


def smallest_fleet(attainment: Attainment, target: float, limit: int = 256) -> int | None:
    """Fewest instances (1..limit) with ``attainment(n) >= target``, assuming attainment rises with n:
    doubling to bracket, then bisection; None if even ``limit`` misses."""
    if not 0 < target <= 1:
        raise ValueError("target must be in (0, 1]")
    cache: dict[int, float] = {}

    def meets(n: int) -> bool:
        if n not in cache:
            cache[n] = attainment(n)
        return cache[n] >= target

    high = 1
    while not meets(high):
        if high >= limit:
            return None
        high = min(2 * high, limit)
    low = high // 2  # misses (or 0: nothing below one instance)
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high


def derating(needed: Sequence[float], smallest: Sequence[int]) -> float | None:
    """``min needed[i] / (smallest[i] - 0.5)`` over intervals whose smallest fleet is more than one
    instance (None when there is none: the calibration says nothing beyond the floor).

    Why the half: n instances being the fewest that meet the target puts the true continuous need in
    (n - 1, n]; its midpoint is the unbiased guess, and ceil(needed / factor) >= ceil(n - 0.5) = n still
    holds for every calibration interval."""
    if len(needed) != len(smallest):
        raise ValueError("needed and smallest must have one entry per interval")
    ratios = [need / (n - 0.5) for need, n in zip(needed, smallest, strict=True) if n > 1 and need > 0]
    return min(ratios) if ratios else None


def calibrate(
    needed: Sequence[float],
    attainments: Sequence[Attainment],
    *,
    target: float,
    slo: str,
    workload: str | None = None,
    interval_s: float | None = None,
    window_s: float | None = None,
    limit: int = 256,
) -> Calibration:
    """The factor from one (model, GPU type)'s calibration intervals: ``needed[i]`` instances by the
    profile, ``attainments[i](n)`` the simulated attainment of interval i on n instances."""
    smallest: list[int] = []
    for index, attain in enumerate(attainments):
        n = smallest_fleet(attain, target, limit)
        if n is None:
            raise ValueError(f"calibration interval {index}: {limit} instances do not reach {target:.0%}")
        smallest.append(n)
    factor = derating(needed, smallest)
    return Calibration(
        factor=1.0 if factor is None else factor,
        target=target,
        slo=slo,
        workload=workload,
        interval_s=interval_s,
        window_s=window_s,
        intervals=len(smallest),
        needed=[round(x, 3) for x in needed],
        smallest=smallest,
        calibrated_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def class_attainment(records: Sequence[RequestRecord], slo: str) -> float:
    """Share of the requests of class ``slo`` that met their SLO (of all requests when none has it):
    the class the plan is made for is the one calibration holds to the target."""
    classes = default_slo_classes()
    own = [r for r in records if r.slo_class == slo] or list(records)
    return sum(slo_met(r, classes) for r in own) / len(own) if own else 1.0


def simulated_attainment(
    requests: Sequence[SimRequest], model: str, emulator_profile: str, slo: str, policy: str = "least-load"
) -> Attainment:
    """``n -> attainment`` of ``requests`` (one interval of one model, arrivals from 0) on n emulated
    instances of ``emulator_profile``, each run starting from idle engines (``sloproxy simulate``'s model)."""
    from ..emulator.fleet import FleetSpec, InstanceSpec
    from ..evaluation.simulate import simulate

    def attainment(n: int) -> float:
        if not requests:
            return 1.0
        instances = [
            InstanceSpec(name=f"{model}-{k}", engine="vllm", model=model, port=10000 + k, profile=emulator_profile)
            for k in range(n)
        ]
        _, records = simulate(FleetSpec(instances=instances), requests, policy)
        return class_attainment(records, slo)

    return attainment


def interval_slices(
    requests: Sequence[SimRequest], start_s: float, interval_s: float, count: int
) -> list[list[SimRequest]]:
    """The requests of each interval, arrivals shifted so each slice starts at 0 (the last interval
    keeps any stragglers past its end, as ``measure_demand`` does)."""
    slices: list[list[SimRequest]] = [[] for _ in range(count)]
    for request in requests:
        index = min(max(int((request.arrival_s - start_s) // interval_s), 0), count - 1)
        slices[index].append(dataclasses.replace(request, arrival_s=request.arrival_s - start_s - index * interval_s))
    return slices


def calibrate_profile(
    profile: InstanceProfile,
    slo: SloTarget,
    slices: Sequence[Sequence[SimRequest]],
    demand: Sequence[IntervalDemand],
    use: Sequence[int],
    *,
    target: float,
    interval_s: float,
    window_s: float,
    emulator_profile: str | None = None,
    workload: str | None = None,
) -> Calibration:
    """Calibrate an emulated profile on intervals ``use`` of one model's workload: ``slices[i]`` its
    requests in interval i (from ``interval_slices``), ``demand[i]`` their measured demand."""
    name = emulator_profile or (profile.target if profile.source == "emulated" else None)
    if name is None:
        raise ValueError(f"{profile.model} on {profile.gpu_type}: only emulated profiles can be calibrated here")
    bare = msgspec.structs.replace(profile, calibration=None)
    planner = Planner([bare], slo, headroom=0.0)
    if profile.model not in planner.by_model:
        raise ValueError(f"{profile.model} on {profile.gpu_type} never meets SLO {slo.name!r}")
    needed = [planner.needed_instances(bare, demand[i]) for i in use]
    attainments = [
        simulated_attainment([r for r in slices[i] if r.model == profile.model], profile.model, name, slo.name)
        for i in use
    ]
    return calibrate(
        needed,
        attainments,
        target=target,
        slo=slo.name,
        workload=workload,
        interval_s=interval_s,
        window_s=window_s,
    )
