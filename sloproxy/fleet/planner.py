"""Capacity planning: instance counts per (model, GPU type, region) per interval at least GPU cost (an integer program).

For one interval, with x[m,g,r] instances of model m on GPU type g in region r (non-negative integers):

    minimise    sum  cost[g] x gpus[m,g] x hours x x[m,g,r]
    subject to  sum_g R[m,g](p[m,r]) x[m,g,r] >= (1 + h) rps[m,r]          for every (m, r)   requests/s
                sum_g T[m,g](p[m,r]) x[m,g,r] >= (1 + h) tps[m,r]          for every (m, r)   output tokens/s
                sum_g x[m,g,r] >= min_instances                             for every (m, r)
                sum_{m(,r)} gpus[m,g] x[m,g,r] <= limit[g(,r)]              for every GPU limit given

R and T are a profile's requests/s and output tokens/s within the SLO at the interval's mean prompt size
(``InstanceProfile.capacity_at``), times the profile's calibrated factor when it has one for the class
(``calibrate.py``: the closed-loop profile overstates what bursty open-loop traffic gets), rps and tps
the forecast peaks (``forecast.py``), h the headroom. The
intervals share nothing (no start-up costs are modelled), so each is solved on its own; the static
"provision for peak" fleet is the same program with every interval's cover rows at once.
Solved by scipy.optimize.milp (HiGHS), relative gap 0: the plan is optimal, not just good.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .forecast import DEFAULT_REGION, IntervalDemand
from .profile import InstanceProfile, SloCapacity, SloTarget, default_deployment


class PlanError(ValueError):
    """No plan exists (or the inputs cannot give one); the message says which demand cannot be met."""


@dataclass(frozen=True, slots=True)
class GpuLimit:
    """At most ``gpus`` GPUs of ``gpu_type`` in use at once (in ``region``, or over all regions)."""

    gpu_type: str
    gpus: int
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One integer variable: instances of a profile in a region."""

    profile: InstanceProfile
    region: str

    @property
    def model(self) -> str:
        return self.profile.model

    @property
    def gpu_type(self) -> str:
        return self.profile.gpu_type

    @property
    def key(self) -> tuple[str, str, str]:
        return self.profile.model, self.profile.gpu_type, self.region


class Allocation(msgspec.Struct, kw_only=True):
    model: str
    region: str
    gpu_type: str
    instances: int
    gpus: int
    cost_per_hour: float
    deployment: str


class IntervalPlan(msgspec.Struct, kw_only=True):
    interval: int
    start_s: float
    hours: float
    allocations: list[Allocation]
    cost: float
    gpu_hours: float
    demand: list[IntervalDemand]


class Plan(msgspec.Struct, kw_only=True):
    slo: SloTarget
    interval_s: float
    headroom: float
    intervals: list[IntervalPlan]
    cost: float
    gpu_hours: float
    peak: list[Allocation]  # one fleet for every interval, enough for each (provisioning for peak)
    peak_cost: float
    peak_gpu_hours: float
    kubernetes: list[dict[str, int]]  # per interval: Deployment name -> replicas

    @property
    def saved_gpu_hours(self) -> float:
        return self.peak_gpu_hours - self.gpu_hours


class Planner:
    """Profiles indexed by model, their capacity tables for one SLO, and the solver's settings."""

    def __init__(
        self,
        profiles: Sequence[InstanceProfile],
        slo: SloTarget,
        *,
        headroom: float = 0.1,
        min_instances: int = 1,
        limits: Sequence[GpuLimit] = (),
    ) -> None:
        if headroom < 0:
            raise ValueError("headroom must be at least 0")
        if min_instances < 0:
            raise ValueError("min_instances must be at least 0")
        self.slo = slo
        self.headroom = headroom
        self.min_instances = min_instances
        self.limits = list(limits)
        self.tables: dict[int, list[SloCapacity]] = {}
        self.by_model: dict[str, list[InstanceProfile]] = {}
        seen: set[tuple[str, str]] = set()
        for profile in profiles:
            if profile.key in seen:
                raise ValueError(f"two profiles for model {profile.model!r} on {profile.gpu_type!r}")
            seen.add(profile.key)
            table = profile.capacity_for(slo)
            if any(row.concurrency > 0 for row in table):  # a profile that never meets the SLO is no option
                self.tables[id(profile)] = table
                self.by_model.setdefault(profile.model, []).append(profile)

    def capacity(self, profile: InstanceProfile, prompt_tokens: float) -> tuple[float, float]:
        """Requests/s and output tokens/s of one instance within the SLO, times its calibrated factor."""
        cap = profile.capacity_at(prompt_tokens, self.tables[id(profile)])
        factor = profile.derating(self.slo)
        return cap.rps * factor, cap.output_tps * factor

    def needed_instances(self, profile: InstanceProfile, row: IntervalDemand) -> float:
        """Instances of ``profile`` alone that cover ``row`` without headroom (fractional; what calibration
        compares with the simulated smallest fleet). Infinite when the profile has no capacity there."""
        rps, tps = self.capacity(profile, row.mean_prompt_tokens)
        need = 0.0
        for demand, have in ((row.rps, rps), (row.output_tps, tps)):
            if demand > 0:
                need = max(need, demand / have if have > 0 else float("inf"))
        return need

    def choices(self, keys: Sequence[tuple[str, str]]) -> list[Choice]:
        """Every (profile, region) variable for the (model, region) pairs in ``keys``."""
        out: list[Choice] = []
        for model, region in keys:
            options = self.by_model.get(model)
            if not options:
                known = ", ".join(sorted(self.by_model)) or "none"
                raise PlanError(
                    f"no profile of model {model!r} meets SLO {self.slo.name!r} (models with usable profiles: {known})"
                )
            out += [Choice(p, region) for p in sorted(options, key=lambda p: p.gpu_type)]
        return out

    def solve(self, covers: Sequence[IntervalDemand], hours: float = 1.0) -> dict[tuple[str, str, str], int]:
        """Least-cost instance counts covering every row of ``covers`` (rows of one (model, region) may
        repeat: the static plan covers all intervals at once). Raises PlanError when infeasible."""
        solution, message = self._solve_raw(covers, hours)
        if solution is None:
            raise PlanError(self._why_infeasible(covers, message))
        return solution

    def _solve_raw(
        self, covers: Sequence[IntervalDemand], hours: float = 1.0
    ) -> tuple[dict[tuple[str, str, str], int] | None, str]:
        """The optimum, or None and HiGHS's message."""
        keys = sorted({(row.model, row.region) for row in covers})
        choices = self.choices(keys)
        n = len(choices)
        cost = np.array([c.profile.instance_cost_per_hour * hours for c in choices])
        rows: list[np.ndarray] = []
        lower: list[float] = []
        upper: list[float] = []
        for row in covers:
            mask = [c.model == row.model and c.region == row.region for c in choices]
            caps = [
                self.capacity(c.profile, row.mean_prompt_tokens) if m else (0.0, 0.0)
                for c, m in zip(choices, mask, strict=True)
            ]
            for need, column in ((row.rps, 0), (row.output_tps, 1)):
                if need > 0:  # scaled to the demand, so every row is about 1 and tolerances are relative
                    rows.append(np.array([cap[column] / need for cap in caps]))
                    lower.append(1.0 + self.headroom)
                    upper.append(np.inf)
        if self.min_instances:
            for model, region in keys:
                rows.append(np.array([1.0 if (c.model, c.region) == (model, region) else 0.0 for c in choices]))
                lower.append(float(self.min_instances))
                upper.append(np.inf)
        for limit in self.limits:
            coefficients = [
                float(c.profile.gpus_per_instance)
                if c.gpu_type == limit.gpu_type and (limit.region is None or c.region == limit.region)
                else 0.0
                for c in choices
            ]
            if any(coefficients):
                rows.append(np.array(coefficients))
                lower.append(-np.inf)
                upper.append(float(limit.gpus))
        constraints = [LinearConstraint(np.vstack(rows), lower, upper)] if rows else []
        result = milp(
            cost,
            integrality=np.ones(n),
            bounds=Bounds(np.zeros(n), np.full(n, np.inf)),
            constraints=constraints,
            options={"mip_rel_gap": 0.0},
        )
        if result.status != 0 or result.x is None:
            return None, str(result.message)
        return {choice.key: round(value) for choice, value in zip(choices, result.x, strict=True)}, ""

    def _why_infeasible(self, covers: Sequence[IntervalDemand], message: str) -> str:
        """Name the demand that cannot be met: a (model, region) alone, or the models together."""
        alone: list[str] = []
        for model, region in sorted({(row.model, row.region) for row in covers}):
            own = [row for row in covers if (row.model, row.region) == (model, region)]
            if self._solve_raw(own)[0] is None:
                peak = max(own, key=lambda row: row.rps)
                alone.append(
                    f"{model} in {region} ({peak.rps:.2f} req/s, {peak.output_tps:.0f} output tokens/s at peak)"
                )
        limits = ", ".join(
            f"{lim.gpu_type}{'@' + lim.region if lim.region else ''} <= {lim.gpus}" for lim in self.limits
        )
        if alone:
            return f"no plan meets the demand of {'; '.join(alone)} with GPU limits {limits or 'none'} ({message})"
        return f"each model fits alone, but not all together within GPU limits {limits or 'none'} ({message})"

    def profile(self, model: str, gpu_type: str) -> InstanceProfile:
        return next(p for p in self.by_model[model] if p.gpu_type == gpu_type)

    def allocations(self, solution: Mapping[tuple[str, str, str], int]) -> list[Allocation]:
        out: list[Allocation] = []
        for (model, gpu_type, region), count in solution.items():
            if count > 0:
                profile = self.profile(model, gpu_type)
                out.append(
                    Allocation(
                        model=model,
                        region=region,
                        gpu_type=gpu_type,
                        instances=count,
                        gpus=count * profile.gpus_per_instance,
                        cost_per_hour=count * profile.instance_cost_per_hour,
                        deployment=deployment_name(profile, region),
                    )
                )
        return sorted(out, key=lambda a: (a.model, a.region, a.gpu_type))

    def plan(self, demand: Mapping[tuple[str, str], list[IntervalDemand]], interval_s: float) -> Plan:
        """The per-interval plan and the static peak fleet for the same demand."""
        if not demand:
            raise PlanError("no demand to plan for")
        hours = interval_s / 3600.0
        count = max(len(rows) for rows in demand.values())
        intervals: list[IntervalPlan] = []
        for index in range(count):
            covers = [rows[index] for rows in demand.values() if index < len(rows)]
            try:
                allocations = self.allocations(self.solve(covers, hours))
            except PlanError as exc:
                raise PlanError(f"interval {index} (from {covers[0].start_s:.0f} s): {exc}") from None
            intervals.append(
                IntervalPlan(
                    interval=index,
                    start_s=covers[0].start_s,
                    hours=hours,
                    allocations=allocations,
                    cost=sum(a.cost_per_hour for a in allocations) * hours,
                    gpu_hours=sum(a.gpus for a in allocations) * hours,
                    demand=covers,
                )
            )
        peak = self.allocations(self.solve([row for rows in demand.values() for row in rows], hours))
        total_hours = hours * count
        return Plan(
            slo=self.slo,
            interval_s=interval_s,
            headroom=self.headroom,
            intervals=intervals,
            cost=sum(i.cost for i in intervals),
            gpu_hours=sum(i.gpu_hours for i in intervals),
            peak=peak,
            peak_cost=sum(a.cost_per_hour for a in peak) * total_hours,
            peak_gpu_hours=sum(a.gpus for a in peak) * total_hours,
            kubernetes=[replicas(i.allocations, every=self._deployments(demand)) for i in intervals],
        )

    def _deployments(self, demand: Mapping[tuple[str, str], list[IntervalDemand]]) -> list[str]:
        """Every Deployment a plan may scale (so one scaled to zero is listed with 0 replicas)."""
        names = {
            deployment_name(profile, region) for model, region in demand for profile in self.by_model.get(model, [])
        }
        return sorted(names)


def deployment_name(profile: InstanceProfile, region: str) -> str:
    """The profile's Deployment (or engine-model-gpu), suffixed by the region unless it is the default."""
    base = profile.deployment or default_deployment(profile)
    return base if region == DEFAULT_REGION else f"{base}-{region}"


def replicas(allocations: Sequence[Allocation], every: Sequence[str] = ()) -> dict[str, int]:
    """Deployment name -> replicas (instances), with 0 for the named Deployments the plan does not use."""
    out = dict.fromkeys(every, 0)
    for allocation in allocations:
        out[allocation.deployment] = out.get(allocation.deployment, 0) + allocation.instances
    return dict(sorted(out.items()))
