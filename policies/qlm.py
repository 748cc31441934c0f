"""QLM's queue management as far as a proxy reaches: request groups, one virtual queue per
instance with a waiting-time estimate, and reordering / reassignment only when a group is
predicted to miss its SLO (EDF over groups, or an integer program for small instances).

QLM (arXiv 2407.00047) groups requests by model and SLO, keeps an ordered list of groups per
instance, estimates a request's wait as the tokens queued ahead of it divided by the instance's
token throughput, and re-plans (EDF, or an integer program with model-swap costs) only when some
group would miss. Here:

* groups are (model, SLO class); FCFS inside a group; the queue serves group heads in arrival
  order until the planner predicts a miss for that model, then in head-deadline order (EDF);
* an instance's virtual queue is what the proxy has in flight there, as predicted KV tokens
  (prompt + p90 reply), and its wait estimate is that divided by the token throughput measured
  from the engine's generation-token counter (``default_tokens_per_s`` until measured);
* the planner (the policy's timer slow path) predicts each group's completion on its instance;
  on a predicted miss it re-assigns groups to instances: an integer program through scipy's HiGHS
  when groups x instances is small (time-capped), EDF greedy otherwise or when the solver fails;
  routing follows the plan; the objective carries the swap time wherever an instance would need
  another model (measured by the proxy's swapper, ``model_swap_s`` until measured);
* a group whose model is loaded nowhere (its instances sleep: sloproxy/swapping.py) misses for sure:
  the planner asks for a swap (:class:`Swap`) onto the sleeping instance that would finish it first,
  swap time included, taking the GPUs from the member of that instance's group whose own waiting work
  has the latest head deadline, and only if that is later than this group's (EDF over the GPUs);
* pulling is gated by the scheduler's budget (a backpressure bound learned from engine metrics;
  QLM's code uses a fixed 10); batch work that has sent nothing is evicted for urgent work.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .base import BackendState, FleetAction, FleetPolicy, Ordering, Policy, PolicySpec, Scorer, Snapshot, Swap
from .parts import BudgetAdmission, EvictForUrgent, LeastLoad
from .presets import QueuedParams

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest

Group = tuple[str, str]  # (model, SLO class name)


def group_of(request: ProxyRequest) -> Group:
    return (request.model, request.slo.name if request.slo is not None else "")


def predicted_tokens(request: ProxyRequest) -> float:
    """Tokens a request adds to a virtual queue: its predicted reply (p50) plus its prompt's prefill
    (prompt tokens are cheap per token; counted at 1/8 of a decoded token)."""
    return request.est_output_tokens + request.est_prompt_tokens / 8


class Throughput:
    """Each instance's decode throughput (tokens/s) from successive generation-token readings."""

    def __init__(self, default_tokens_per_s: float, smoothing: float = 0.3) -> None:
        self.default = default_tokens_per_s
        self.smoothing = smoothing
        self._last: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}

    def observe(self, backend: BackendState) -> None:
        load, read_at = backend.load, getattr(backend, "load_read_at", None)
        if load is None or load.generation_tokens is None or read_at is None:
            return
        last = self._last.get(backend.name)
        self._last[backend.name] = (read_at, load.generation_tokens)
        if last is None or read_at <= last[0] or load.running == 0:
            return
        rate = (load.generation_tokens - last[1]) / (read_at - last[0])
        old = self._rate.get(backend.name)
        self._rate[backend.name] = rate if old is None else old + self.smoothing * (rate - old)

    def rate(self, backend: BackendState) -> float:
        return max(1.0, self._rate.get(backend.name, self.default))

    def wait_s(self, backend: BackendState) -> float:
        """The virtual queue's estimated drain time: in-flight predicted KV tokens / throughput."""
        return backend.kv_reserved_tokens / self.rate(backend)


@dataclass(slots=True)
class GroupState:
    group: Group
    head_deadline: float  # the earliest first deadline among its waiting requests
    tokens: float  # predicted tokens of its waiting requests


def plan_greedy(
    groups: Sequence[GroupState], serving: dict[str, list[str]], wait: dict[str, float], rate: dict[str, float]
) -> dict[Group, str]:
    """EDF over groups: the earliest head deadline first, each onto the instance that finishes it soonest."""
    backlog = dict(wait)
    plan: dict[Group, str] = {}
    for state in sorted(groups, key=lambda s: s.head_deadline):
        options = serving.get(state.group[0], [])
        if not options:
            continue
        best = min(options, key=lambda b: backlog[b] + state.tokens / rate[b])
        backlog[best] += state.tokens / rate[best]
        plan[state.group] = best
    return plan


def plan_milp(
    groups: Sequence[GroupState],
    instances: Sequence[str],
    models: dict[str, str],
    wait: dict[str, float],
    rate: dict[str, float],
    now: float,
    swap_s: float,
    time_limit_s: float,
) -> dict[Group, str] | None:
    """Assign each group to one instance minimising total lateness (+ model-swap time where an instance
    would serve a group of another model) with scipy's HiGHS; None when it finds no solution in time.

    Variables: x[g,i] binary, L[g] >= 0. Lateness of g on i counts every group placed on i as ahead
    of it (conservative, linear): L[g] >= wait[i] + sum_g' tokens[g'] x[g',i] / rate[i] - slack[g]
    - M (1 - x[g,i]).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_g, n_i = len(groups), len(instances)
    n_x = n_g * n_i
    cost = np.zeros(n_x + n_g)
    cost[n_x:] = 1.0
    for g, state in enumerate(groups):
        for i, name in enumerate(instances):
            if models[name] != state.group[0]:
                cost[g * n_i + i] = swap_s
    slack = [s.head_deadline - now for s in groups]
    big = sum(wait.values()) + sum(s.tokens / min(rate.values()) for s in groups) + max(0.0, -min(slack)) + 1.0
    rows, lower, upper = [], [], []
    for g in range(n_g):  # each group on exactly one instance
        row = np.zeros(n_x + n_g)
        row[g * n_i : (g + 1) * n_i] = 1.0
        rows.append(row), lower.append(1.0), upper.append(1.0)
    for g in range(n_g):
        for i, name in enumerate(instances):
            row = np.zeros(n_x + n_g)
            for h, other in enumerate(groups):
                row[h * n_i + i] += other.tokens / rate[name]
            row[g * n_i + i] += big
            row[n_x + g] = -1.0
            rows.append(row), lower.append(-np.inf), upper.append(slack[g] - wait[name] + big)
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_g)])
    bounds = Bounds(np.zeros(n_x + n_g), np.concatenate([np.ones(n_x), np.full(n_g, np.inf)]))
    result = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lower, upper),
        integrality=integrality,
        bounds=bounds,
        options={"time_limit": time_limit_s, "presolve": True},
    )
    if result.x is None:
        return None
    x = result.x[:n_x].reshape(n_g, n_i)
    return {state.group: instances[int(np.argmax(x[g]))] for g, state in enumerate(groups)}


class QLMPlanner(FleetPolicy):
    """The global scheduler, run on the proxy's timer: predicts misses, re-plans, evicts for urgent work."""

    def __init__(
        self,
        throughput: Throughput,
        *,
        milp_max_vars: int = 64,
        time_limit_s: float = 0.01,
        swap_s: float = 0.0,
        solve_every_s: float = 1.0,
        evict: EvictForUrgent | None = None,
    ) -> None:
        self.throughput = throughput
        self.milp_max_vars = milp_max_vars
        self.time_limit_s = time_limit_s
        self.swap_s = swap_s
        self.evict = evict
        self.edf_models: set[str] = set()  # models whose queue runs in EDF-over-groups order
        self.assignment: dict[Group, str] = {}
        self.plans = {"milp": 0, "greedy": 0}
        self.solve_every_s = solve_every_s
        self._solved_at = -math.inf
        self.groups: list[GroupState] = []  # the waiting groups of the last plan
        self.swaps_asked = 0

    def actions(
        self, snapshot: Snapshot, waiting: Sequence[ProxyRequest], running: Sequence[ProxyRequest]
    ) -> list[FleetAction]:
        self.replan(snapshot, waiting)
        actions: list[FleetAction] = list(self.swaps(snapshot))
        if self.evict is not None:
            actions += self.evict.actions(snapshot, waiting, running)
        return actions

    def swap_cost(self, backend: BackendState) -> float:
        """Seconds to bring ``backend``'s model in: measured by the proxy's swapper, else ``model_swap_s``."""
        measured = getattr(backend, "swap_s", None)
        return self.swap_s if measured is None else measured

    def swaps(self, snapshot: Snapshot) -> list[Swap]:
        """Swaps for waiting groups whose model no routable instance serves (see the module doc)."""
        loaded = {model for b in snapshot.backends if b.healthy for model in b.models}
        claimed: set[str] = set()  # GPU groups given a swap in this round
        swaps: list[Swap] = []
        for state in sorted(self.groups, key=lambda s: s.head_deadline):
            model = state.group[0]
            if model in loaded:
                continue
            sleeping = [
                b
                for b in snapshot.backends
                if getattr(b, "asleep", False) and model in b.models and _gpu_group(b) not in (None, *claimed)
            ]
            if not sleeping:
                continue
            target = min(sleeping, key=lambda b: self.swap_cost(b) + state.tokens / self.throughput.rate(b))
            group = _gpu_group(target)
            members = [b for b in snapshot.backends if b.healthy and _gpu_group(b) == group]
            victim = max(members, key=self._held_deadline, default=None)
            if victim is not None and self._held_deadline(victim) <= state.head_deadline:
                continue  # the instance's own work is due first: EDF keeps it there
            claimed.add(group)  # type: ignore[arg-type]
            cost = self.swap_cost(target)
            done, slack = cost + state.tokens / self.throughput.rate(target), state.head_deadline - snapshot.now
            reason = (
                f"group {state.group} is loaded nowhere; on {target.name} it would finish in {done:.1f}s "
                f"(swap {cost:.1f}s); deadline in {slack:.1f}s"
            )
            swaps.append(Swap(model, target.name, None if victim is None else victim.name, reason))
        self.swaps_asked += len(swaps)
        return swaps

    def _held_deadline(self, backend: BackendState) -> float:
        """The earliest head deadline among waiting groups of ``backend``'s models (inf: none waits)."""
        return min((s.head_deadline for s in self.groups if s.group[0] in backend.models), default=math.inf)

    def replan(self, snapshot: Snapshot, waiting: Sequence[ProxyRequest]) -> None:
        backends = [b for b in snapshot.backends if b.healthy]
        for backend in backends:
            self.throughput.observe(backend)
        states: dict[Group, GroupState] = {}
        for request in waiting:
            key = group_of(request)
            deadline = request.urgent_deadline if request.urgent_deadline is not None else math.inf
            state = states.get(key)
            if state is None:
                states[key] = GroupState(key, deadline, predicted_tokens(request))
            else:
                state.head_deadline = min(state.head_deadline, deadline)
                state.tokens += predicted_tokens(request)
        wait = {b.name: self.throughput.wait_s(b) for b in backends}
        rate = {b.name: self.throughput.rate(b) for b in backends}
        serving: dict[str, list[str]] = {}
        models: dict[str, str] = {}
        for b in backends:
            for model in b.models:
                serving.setdefault(model, []).append(b.name)
            models[b.name] = next(iter(b.models)) if b.models else ""
        groups = self.groups = list(states.values())
        current = plan_greedy(groups, serving, wait, rate)
        at_risk = {s.group[0] for s in groups if self._misses(s, current, groups, wait, rate, snapshot.now)}
        self.edf_models = at_risk
        if not at_risk:
            self.assignment = {}
            return
        plan = None
        finite = [s for s in groups if math.isfinite(s.head_deadline)]
        solve = snapshot.now - self._solved_at >= self.solve_every_s
        if solve and finite and len(finite) * len(backends) <= self.milp_max_vars and len(finite) == len(groups):
            self._solved_at = snapshot.now
            try:
                swap_s = self._measured_swap_s(backends)
                plan = plan_milp(
                    groups, [b.name for b in backends], models, wait, rate, snapshot.now, swap_s, self.time_limit_s
                )
            except (ValueError, RuntimeError):
                plan = None
            # the integer program may place a group where its model is not served: never route there
            if plan is not None and any(g[0] not in backends_models(snapshot, name) for g, name in plan.items()):
                plan = None
        if plan is None:
            plan, self.plans["greedy"] = current, self.plans["greedy"] + 1
        else:
            self.plans["milp"] += 1
        self.assignment = plan

    def _measured_swap_s(self, backends: Sequence[BackendState]) -> float:
        """The fleet's mean measured swap time, or ``model_swap_s`` while none was measured."""
        measured = [m for b in backends if (m := getattr(b, "swap_s", None)) is not None]
        return sum(measured) / len(measured) if measured else self.swap_s

    @staticmethod
    def _misses(
        state: GroupState,
        plan: dict[Group, str],
        groups: Sequence[GroupState],
        wait: dict[str, float],
        rate: dict[str, float],
        now: float,
    ) -> bool:
        name = plan.get(state.group)
        if name is None:
            return False
        return now + wait[name] + state.tokens / rate[name] > state.head_deadline


def _gpu_group(backend: BackendState) -> str | None:
    return getattr(backend, "gpu_group", None)


def backends_models(snapshot: Snapshot, name: str) -> frozenset[str]:
    for backend in snapshot.backends:
        if backend.name == name:
            return backend.models
    return frozenset()


class QLMOrdering(Ordering):
    """One FIFO per group; heads served in arrival order, or by head deadline while the planner
    predicts a miss for this model (group counts are small: peek scans the heads)."""

    def __init__(self, planner: QLMPlanner) -> None:
        self.planner = planner
        self._groups: dict[Group, deque[ProxyRequest]] = {}
        self._live: set[int] = set()

    def push(self, request: ProxyRequest) -> None:
        self._groups.setdefault(group_of(request), deque()).append(request)
        self._live.add(id(request))

    def _heads(self) -> Iterator[ProxyRequest]:
        for key in list(self._groups):
            queue = self._groups[key]
            while queue and id(queue[0]) not in self._live:
                queue.popleft()
            if queue:
                yield queue[0]
            else:
                del self._groups[key]

    def peek(self) -> ProxyRequest | None:
        heads = list(self._heads())
        if not heads:
            return None
        if heads[0].model in self.planner.edf_models:
            return min(heads, key=lambda r: (r.band, r.urgent_deadline or math.inf, r.seq))
        return min(heads, key=lambda r: (r.band, r.seq))

    def pop(self) -> ProxyRequest:
        request = self.peek()
        if request is None:
            raise IndexError("pop from an empty queue")
        self._groups[group_of(request)].popleft()
        self._live.discard(id(request))
        return request

    def remove(self, request: ProxyRequest) -> bool:
        if id(request) not in self._live:
            return False
        self._live.discard(id(request))
        return True

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ProxyRequest]:
        for queue in self._groups.values():
            yield from (r for r in queue if id(r) in self._live)


class VirtualQueueRouting(Scorer):
    """The planned instance when a plan exists for the request's group; otherwise the instance whose
    virtual queue drains soonest: score 1 / (1 + estimated wait in seconds)."""

    def __init__(self, planner: QLMPlanner) -> None:
        self.planner = planner

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        planned = self.planner.assignment.get(group_of(request))
        if planned is not None:
            return 1.0 if planned == backend.name else 0.0
        return 1.0 / (1.0 + self.planner.throughput.wait_s(backend))


class QLMParams(QueuedParams, forbid_unknown_fields=True):
    default_tokens_per_s: float = 500.0  # throughput assumed until an instance's counter is read
    milp_max_vars: int = 64  # groups x instances up to which the integer program runs
    milp_time_limit_s: float = 0.01  # HiGHS time cap per plan; EDF greedy when it finds nothing
    model_swap_s: float = 30.0  # planning cost of a model swap until the proxy has measured one
    milp_every_s: float = 1.0  # the integer program runs at most this often (EDF greedy in between)
    virtual_queue_weight: float = 1.0


def build(params: QLMParams) -> Policy:
    throughput = Throughput(params.default_tokens_per_s)
    evict = EvictForUrgent(params.evict_margin_s) if params.evict else None
    planner = QLMPlanner(
        throughput,
        milp_max_vars=params.milp_max_vars,
        time_limit_s=params.milp_time_limit_s,
        swap_s=params.model_swap_s,
        solve_every_s=params.milp_every_s,
        evict=evict,
    )
    return Policy(
        "qlm",
        ordering=lambda: QLMOrdering(planner),
        admission=BudgetAdmission(params.kv_limit, params.reserve),
        scorers=[(VirtualQueueRouting(planner), params.virtual_queue_weight), (LeastLoad(), params.least_load_weight)],
        fleet=planner,
        uses_predictions=True,
    )


QLM = PolicySpec(
    "qlm",
    QLMParams,
    build,
    "Groups (model x class), virtual queues with wait estimates, EDF / HiGHS re-plans only on predicted misses.",
)
