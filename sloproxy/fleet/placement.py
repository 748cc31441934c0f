"""Placement (SeaLLM-style): which model each GPU group should keep awake, from measured demand.

The swapper's reactive rule wakes a model only once its requests wait. Placement is the proactive
half: from per-model demand and per-model capacity (what one instance serves, in the same unit; the
proxy uses requests/s), it decides in two stages which model(s) each group holds:

1. how many instances each model gets, in proportion to demand / capacity (each further instance goes
   where the need per instance is largest, and only while a model's need exceeds its instances; a
   model with demand gets at least one while instances last; a model without demand gets none);
2. which group holds which model: only groups with a backend for the model are candidates; groups
   keep what they hold when it is still wanted (fewest swaps), the rest go to the model with the
   largest unmet need, cheapest measured swap first.

A new placement is adopted only if the load it serves over ``horizon_s`` beats what the swaps cost
(each swap serves nothing on its group for its measured duration) by ``margin``: hysteresis, so the
same or similar demand never ping-pongs. :class:`IntervalController` re-evaluates sooner when the
demand mix moves away from the one the current placement was made for, later while it is stable.

Pure: no I/O, no clock. ``sloproxy/placement_loop.py`` measures the demand, calls :func:`place` and
hands adopted swaps to the swapper (drain first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GroupView:
    """One GPU group: the models it has backends for, those awake now, and how many may be awake."""

    name: str
    models: frozenset[str]
    awake: frozenset[str]
    slots: int = 1


@dataclass(frozen=True, slots=True)
class Placement:
    """Per group, the models it should hold; the swaps (group, out or None, in) to get there."""

    groups: dict[str, frozenset[str]]
    swaps: tuple[tuple[str, str | None, str], ...] = ()
    served: float = 0.0  # predicted tokens/s served
    current_served: float = 0.0  # what the current placement serves of the same demand
    cost: float = 0.0  # predicted tokens not served while swapping
    adopt: bool = False  # gain over the horizon beats the swap cost
    reason: str = ""


def allocate(
    demand: Mapping[str, float], capacity: Mapping[str, float], limit: Mapping[str, int], total: int
) -> dict[str, int]:
    """Stage 1: instances per model, proportional to demand / capacity, at most ``limit[m]`` each and
    ``total`` in all; each model with demand gets one first (most needed first) while instances last."""
    need = {m: d / max(capacity.get(m, 1.0), 1e-9) for m, d in demand.items() if d > 0 and limit.get(m, 0) > 0}
    counts = dict.fromkeys(need, 0)
    left = total
    for model in sorted(need, key=lambda m: (-need[m], m)):
        if left == 0:
            break
        counts[model] = 1
        left -= 1
    while left > 0:
        open_models = [m for m in need if counts[m] < limit[m]]
        if not open_models:
            break
        # the next instance goes where need per instance (after this one) is largest
        model = max(open_models, key=lambda m: (need[m] / (counts[m] + 1), need[m], m))
        if need[model] <= counts[model]:  # everyone is covered: spare instances stay as they are
            break
        counts[model] += 1
        left -= 1
    return {m: c for m, c in counts.items() if c > 0}


def served(holding: Mapping[str, frozenset[str]], demand: Mapping[str, float], capacity: Mapping[str, float]) -> float:
    """Predicted tokens/s served: per model, its demand up to the capacity of the instances holding it."""
    instances: dict[str, int] = {}
    for models in holding.values():
        for model in models:
            instances[model] = instances.get(model, 0) + 1
    return sum(min(d, instances.get(m, 0) * capacity.get(m, 1.0)) for m, d in demand.items())


def place(
    groups: list[GroupView],
    demand: Mapping[str, float],
    capacity: Mapping[str, float],
    swap_s: Mapping[tuple[str, str], float] | None = None,
    default_swap_s: float = 30.0,
    horizon_s: float = 60.0,
    margin: float = 1.5,
) -> Placement:
    """Stage 2 on top of :func:`allocate`: the placement, its swaps, and whether it is worth adopting.
    ``swap_s[(group, model)]``: measured seconds to bring ``model`` into ``group``."""
    swap_s = swap_s or {}
    limit: dict[str, int] = {}
    for group in groups:
        for model in group.models:
            limit[model] = limit.get(model, 0) + group.slots
    quota = allocate(demand, capacity, limit, sum(g.slots for g in groups))
    holding: dict[str, set[str]] = {g.name: set() for g in groups}
    free: dict[str, int] = {g.name: g.slots for g in groups}
    # keep what groups hold while the model still has quota: no swap for it
    for group in sorted(groups, key=lambda g: g.name):
        for model in sorted(group.awake):
            if quota.get(model, 0) > 0 and free[group.name] > 0:
                holding[group.name].add(model)
                free[group.name] -= 1
                quota[model] -= 1
    # the rest: largest unmet need first, into its cheapest candidate group
    while True:
        wanted = [m for m, q in quota.items() if q > 0]
        choices = [
            (
                -demand[m] / max(capacity.get(m, 1.0), 1e-9) / (quota[m]),
                swap_s.get((g.name, m), default_swap_s),
                g.name,
                m,
            )
            for m in wanted
            for g in groups
            if m in g.models and free[g.name] > 0 and m not in holding[g.name]
        ]
        if not choices:
            break
        _, _, group_name, model = min(choices)
        holding[group_name].add(model)
        free[group_name] -= 1
        quota[model] -= 1
    # groups with room left keep (or have) whatever they held: no pointless sleeps
    for group in groups:
        for model in sorted(group.awake - holding[group.name]):
            if free[group.name] > 0:
                holding[group.name].add(model)
                free[group.name] -= 1
    result = {name: frozenset(models) for name, models in holding.items()}
    swaps: list[tuple[str, str | None, str]] = []
    cost = 0.0
    for group in sorted(groups, key=lambda g: g.name):
        incoming = sorted(result[group.name] - group.awake)
        outgoing = sorted(group.awake - result[group.name])
        for index, model in enumerate(incoming):
            victim = outgoing[index] if index < len(outgoing) else None
            swaps.append((group.name, victim, model))
            seconds = swap_s.get((group.name, model), default_swap_s)
            cost += seconds * capacity.get(model, 1.0)
    new = served(result, demand, capacity)
    current = served({g.name: g.awake for g in groups}, demand, capacity)
    gain = (new - current) * horizon_s
    if not swaps:
        return Placement(result, (), new, current, 0.0, False, "no change")
    adopt = gain > margin * cost
    reason = f"gain {gain:.0f} tokens over {horizon_s:g}s vs swap cost {cost:.0f} (margin {margin:g})"
    return Placement(result, tuple(swaps), new, current, cost, adopt, reason)


def mix_distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Total-variation distance between two demand mixes (shares of the total), in [0, 1]."""
    total_a, total_b = sum(a.values()), sum(b.values())
    if total_a <= 0 and total_b <= 0:
        return 0.0
    if total_a <= 0 or total_b <= 0:
        return 1.0
    models = set(a) | set(b)
    return 0.5 * sum(abs(a.get(m, 0.0) / total_a - b.get(m, 0.0) / total_b) for m in models)


@dataclass(slots=True)
class IntervalController:
    """How long until the next re-evaluation: halves while the demand mix has moved more than
    ``shift`` from the one the placement was made for, grows by ``growth`` while it has not."""

    min_s: float
    max_s: float
    shift: float = 0.2
    growth: float = 1.5
    interval_s: float = field(default=math.nan)
    reference: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if math.isnan(self.interval_s):
            self.interval_s = self.min_s

    def placed(self, demand: Mapping[str, float]) -> None:
        """A placement was made (or confirmed) for ``demand``: distances are measured from it."""
        self.reference = dict(demand)

    def next_interval(self, demand: Mapping[str, float]) -> float:
        distance = mix_distance(demand, self.reference)
        if distance > self.shift:
            self.interval_s = max(self.min_s, self.interval_s / 2)
        else:
            self.interval_s = min(self.max_s, self.interval_s * self.growth)
        return self.interval_s
