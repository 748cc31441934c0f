"""The live half of placement: measure per-model demand, decide, and swap ahead of the queue.

:mod:`sloproxy.fleet.placement` decides, given demand and capacity, which models each GPU group
should keep awake and whether moving there is worth its swaps. This loop feeds it: every request
for a model that grouped backends serve counts as an arrival in a per-model rate that decays over
``window_s``; each evaluation reads the groups' current residents and measured swap costs from the
:class:`~sloproxy.swapping.Swapper`, and an adopted placement's swaps are handed to the swapper as
:class:`~sloproxy.policies.base.Swap` actions. The swapper carries them out exactly as a policy's
swaps: the victim drains first (nothing in flight is aborted) and a busy victim that woke less than
``min_awake_s`` ago is not taken. The next evaluation comes sooner while the demand mix moves and
later while it holds (:class:`~sloproxy.fleet.placement.IntervalController`).

The reactive rule stays: a request for a model no group holds still wakes it at once. Placement
adds what that rule cannot see, e.g. a second instance for a model whose demand outgrows one while
another group idles on a model nobody asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .config import PlacementConfig
from .fleet.placement import GroupView, IntervalController, Placement, place
from .fleet.profile import InstanceProfile, load_profile
from .policies.base import Swap
from .swapping import Swapper

log = logging.getLogger("sloproxy.placement")


class DecayingRate:
    """Arrivals per second, exponentially weighted over ``window_s``: O(1) per arrival."""

    __slots__ = ("_at", "_mass", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._mass = 0.0
        self._at = 0.0

    def add(self, now: float, count: float = 1.0) -> None:
        self._mass = self._mass * math.exp(-(now - self._at) / self.window_s) + count
        self._at = now

    def rate(self, now: float) -> float:
        return self._mass * math.exp(-(now - self._at) / self.window_s) / self.window_s


PROMPT_SMOOTHING = 0.05  # EWMA weight of each request's prompt size in a model's mean (capacity depends on it)


def load_profiles(paths: Sequence[str]) -> dict[str, list[InstanceProfile]]:
    """`sloproxy profile` files by the model they measured (config.py has checked that they load)."""
    profiles: dict[str, list[InstanceProfile]] = {}
    for path in paths:
        profile = load_profile(path)
        profiles.setdefault(profile.model, []).append(profile)
    return profiles


def profile_capacity(profiles: Sequence[InstanceProfile], prompt_tokens: float) -> float:
    """One instance's requests/s within its profile's SLO at this mean prompt size, in the proxy's seconds
    (a profile of an emulator at speedup K recorded K-times-slower figures: ``time_scale``), derated by
    its calibration; the mean over the model's profiles (its groups may hold different GPU types)."""
    rates = [p.capacity_at(prompt_tokens).rps * p.time_scale * p.derating(p.slo) for p in profiles]
    return sum(rates) / len(rates)


class PlacementLoop:
    """Proactive placement over the swapper's GPU groups (one per proxy; idle without groups)."""

    def __init__(
        self,
        swapper: Swapper,
        config: PlacementConfig,
        clock: Callable[[], float] = time.monotonic,
        profiles: Mapping[str, Sequence[InstanceProfile]] | None = None,
    ) -> None:
        self.swapper = swapper
        self.config = config
        self.clock = clock
        self.models = frozenset(m for members in swapper.groups.values() for b in members for m in b.models)
        self._rates: dict[str, DecayingRate] = {m: DecayingRate(config.window_s) for m in self.models}
        if profiles is None:
            profiles = load_profiles(config.profiles) if config.enabled else {}
        self.profiles = {m: list(ps) for m, ps in profiles.items() if m in self.models}
        self._prompt_tokens: dict[str, float] = {}  # mean prompt size per model, for profile capacity
        self.interval = IntervalController(config.min_interval_s, config.max_interval_s, config.shift)
        self.outcomes: Counter[str] = Counter()  # evaluations by outcome; swaps handed over / declined
        self.last: Placement | None = None
        self.last_demand: dict[str, float] = {}  # what the last evaluation decided on
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled and self.swapper.enabled

    def rate(self, model: str) -> float:
        """Measured requests per second for ``model`` (0 for a model no group serves)."""
        rate = self._rates.get(model)
        return 0.0 if rate is None else rate.rate(self.clock())

    def observe(self, model: str, prompt_tokens: int = 0) -> None:
        """One request for ``model`` arrived (called for every request; a dict lookup when unknown)."""
        rate = self._rates.get(model)
        if rate is not None:
            rate.add(self.clock())
            if model in self.profiles:
                mean = self._prompt_tokens.get(model)
                self._prompt_tokens[model] = (
                    float(prompt_tokens) if mean is None else mean + PROMPT_SMOOTHING * (prompt_tokens - mean)
                )

    def capacity(self) -> dict[str, float]:
        """Requests/s one instance serves per model: configured, else from its profiles, else 1."""
        capacity = {}
        for model in self.models:
            if model in self.config.capacity_rps:
                capacity[model] = self.config.capacity_rps[model]
            elif model in self.profiles:
                capacity[model] = max(profile_capacity(self.profiles[model], self._prompt_tokens.get(model, 1.0)), 1e-6)
            else:
                capacity[model] = 1.0
        return capacity

    def demand(self) -> dict[str, float]:
        """Requests per second per model; below one request per window counts as none."""
        now = self.clock()
        floor = 1.0 / self.config.window_s
        rates = {m: r.rate(now) for m, r in self._rates.items()}
        return {m: rps for m, rps in rates.items() if rps >= floor}

    def groups(self) -> list[GroupView]:
        """Each group's models and current residents, as the swapper holds them."""
        views = []
        for name, members in sorted(self.swapper.groups.items()):
            models = frozenset(m for b in members for m in b.models)
            awake = frozenset(m for b in members if not b.asleep for m in b.models)
            views.append(GroupView(name, models, awake, self.swapper.config.awake_per_group))
        return views

    def swap_costs(self) -> dict[tuple[str, str], float]:
        """Measured seconds to bring a model into a group (``Backend.swap_s``, from the swapper)."""
        costs: dict[tuple[str, str], float] = {}
        for name, members in self.swapper.groups.items():
            for backend in members:
                if backend.swap_s is not None:
                    for model in backend.models:
                        costs[(name, model)] = backend.swap_s
        return costs

    # ----- deciding ----------------------------------------------------------------------------------
    def evaluate(self) -> Placement | None:
        """One evaluation: decide and hand an adopted placement's swaps to the swapper.
        None: postponed, a swap is under way (its group's residents are about to change)."""
        if self.swapper.busy:
            self.outcomes["postponed"] += 1
            return None
        demand = self.last_demand = self.demand()
        decision = place(
            self.groups(),
            demand,
            self.capacity(),
            self.swap_costs(),
            self.config.default_swap_s,
            self.config.horizon_s,
            self.config.margin,
        )
        self.last = decision
        if not decision.swaps:
            self.outcomes["unchanged"] += 1
            self.interval.placed(demand)
        elif not decision.adopt:
            self.outcomes["not_worth_it"] += 1
        else:
            self.outcomes["adopted"] += 1
            self.interval.placed(demand)
            log.info("placement adopted (%s): %s", decision.reason, decision.swaps)
            for group, out_model, in_model in decision.swaps:
                self._hand_over(group, out_model, in_model, decision.reason)
        return decision

    def _hand_over(self, group: str, out_model: str | None, in_model: str, reason: str) -> None:
        members = self.swapper.groups[group]
        target = next((b for b in members if b.asleep and in_model in b.models), None)
        victim = (
            None if out_model is None else next((b for b in members if not b.asleep and out_model in b.models), None)
        )
        if target is None or (out_model is not None and victim is None):
            self.outcomes["swap_declined"] += 1
            return
        action = Swap(in_model, target.name, None if victim is None else victim.name, f"placement: {reason}")
        self.outcomes["swap_started" if self.swapper.request(action) else "swap_declined"] += 1

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled and self._task is None:
            self.swapper.demand_rate = self.rate  # the reactive rule spares the most asked-for residents
            self._task = asyncio.create_task(self._loop(), name="placement")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        wait = self.config.min_interval_s
        while True:
            await asyncio.sleep(wait)
            try:
                decision = self.evaluate()
            except Exception:  # a bug here must not stop placement for good; the reactive rule still runs
                log.exception("placement evaluation failed")
                decision = None
            wait = self.config.min_interval_s if decision is None else self.interval.next_interval(self.last_demand)


class PlacementCollector:
    """Prometheus: evaluations by outcome, the current interval, measured demand per model."""

    def __init__(self, loop: PlacementLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator:
        outcomes = CounterMetricFamily(
            "sloproxy_placement_outcomes",
            "Placement evaluations by outcome, and the swaps they handed to the swapper.",
            labels=["outcome"],
        )
        for outcome in ("adopted", "unchanged", "not_worth_it", "postponed", "swap_started", "swap_declined"):
            outcomes.add_metric([outcome], self.loop.outcomes[outcome])
        yield outcomes
        yield GaugeMetricFamily(
            "sloproxy_placement_interval_seconds",
            "Seconds until the next placement evaluation (shorter while demand moves).",
            value=self.loop.interval.interval_s,
        )
        demand = GaugeMetricFamily(
            "sloproxy_placement_demand_rps", "Measured requests per second per grouped model.", labels=["model"]
        )
        measured = self.loop.demand()
        for model in sorted(self.loop.models):
            demand.add_metric([model], measured.get(model, 0.0))
        yield demand
        capacity = GaugeMetricFamily(
            "sloproxy_placement_capacity_rps",
            "Requests per second one instance serves, per grouped model (config, profile or 1).",
            labels=["model"],
        )
        for model, rps in sorted(self.loop.capacity().items()):
            capacity.add_metric([model], rps)
        yield capacity
