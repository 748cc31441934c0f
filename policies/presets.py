"""The built-in policies, registered in the ``sloproxy.policies`` entry-point group."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import NoParams, Policy, PolicySpec
from .orderings import PriorityFair, edf, fifo
from .parts import BudgetAdmission, EvictForUrgent, LeastLoad, PrefixAffinity


class QueuedParams(msgspec.Struct, forbid_unknown_fields=True):
    kv_limit: float = 0.95  # a backend whose KV usage is at or above this takes nothing new
    reserve: float = 0.25  # share of each budget kept for band-0 (urgent) work
    least_load_weight: float = 1.0
    prefix_affinity_weight: float = 0.0  # > 0: also prefer the backend whose prefix cache holds the prompt
    evict: bool = True  # edf / priority-fair: evict lower-band work for urgent work about to miss
    evict_margin_s: float = 0.5


class PriorityFairParams(QueuedParams, forbid_unknown_fields=True):
    quantum_tokens: Annotated[int, msgspec.Meta(gt=0)] = 1024
    tenant_weights: dict[str, Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(default_factory=dict)


def _round_robin(_: NoParams) -> Policy:
    return Policy("round-robin", ordering=fifo, queued=False)


class LeastLoadParams(msgspec.Struct, forbid_unknown_fields=True):
    prefix_affinity_weight: float = 0.0


def _scorers(least_load: float, prefix_affinity: float) -> list:
    scorers: list = [(LeastLoad(), least_load)]
    if prefix_affinity > 0:
        scorers.append((PrefixAffinity(), prefix_affinity))
    return scorers


def _least_load(params: LeastLoadParams) -> Policy:
    return Policy("least-load", ordering=fifo, queued=False, scorers=_scorers(1.0, params.prefix_affinity_weight))


def _queued(name: str, params: QueuedParams, ordering, *, may_evict: bool = True) -> Policy:
    return Policy(
        name,
        ordering=ordering,
        admission=BudgetAdmission(params.kv_limit, params.reserve),
        scorers=_scorers(params.least_load_weight, params.prefix_affinity_weight),
        fleet=EvictForUrgent(params.evict_margin_s) if may_evict and params.evict else None,
        uses_predictions=True,  # deadlines, shedding and budgets read the estimated reply length
    )


ROUND_ROBIN = PolicySpec(
    "round-robin",
    NoParams,
    _round_robin,
    "No proxy queue; rotate over healthy backends (the nginx / LiteLLM-shuffle baseline).",
)
LEAST_LOAD = PolicySpec(
    "least-load",
    LeastLoadParams,
    _least_load,
    "No proxy queue; the backend with the least in-flight + engine-reported waiting work.",
)
FCFS = PolicySpec(
    "fcfs",
    QueuedParams,
    lambda p: _queued("fcfs", p, fifo, may_evict=False),
    "A proxy queue in arrival order, dispatched as backends' budgets allow.",
)
EDF = PolicySpec(
    "edf",
    QueuedParams,
    lambda p: _queued("edf", p, edf),
    "A proxy queue ordered by deadline (TTFT for interactive, end-to-end for batch).",
)
PRIORITY_FAIR = PolicySpec(
    "priority-fair",
    PriorityFairParams,
    lambda p: _queued("priority-fair", p, lambda: PriorityFair(p.quantum_tokens, p.tenant_weights)),
    "Strict priority bands; inside a band, deficit round robin across tenants by tokens served.",
)
