"""UELLM's batching as far as a proxy reaches: requests sorted by SLO + predicted length, released
in waves of similar predicted length to the same instance.

UELLM (arXiv 2409.14961) sorts queries by SLO + 0.5 x predicted length and grows a batch while the
added padding cost stays under a threshold (at most 10 per batch). Engines batch continuously and
the proxy cannot form their batches, so a *wave* here is consecutive dispatches that share a
length bucket: they go to the same instance (up to ``wave_size``), so they decode together and end
together. The key is the request's first deadline plus ``length_weight`` x its predicted decode
time (p50 x ``tpot_s``): tight and short first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import BackendState, Policy, PolicySpec, Scorer, Snapshot
from .ecoserve import length_bucket
from .orderings import HeapOrdering
from .parts import BudgetAdmission, EvictForUrgent, LeastLoad
from .presets import QueuedParams

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


def slo_length_order(length_weight: float = 0.5, tpot_s: float = 0.03) -> HeapOrdering:
    """Band, then first deadline + ``length_weight`` x predicted decode seconds."""

    def key(request: ProxyRequest) -> tuple:
        deadline = request.urgent_deadline if request.urgent_deadline is not None else math.inf
        return (request.band, deadline + length_weight * request.est_output_tokens * tpot_s)

    return HeapOrdering(key)


class WaveAffinity(Scorer):
    """Score 1 for the instance of the open wave when the request joins it (same length bucket and
    model, fewer than ``wave_size`` members), else 0; a request that does not join opens a new wave
    where the other scorers send it."""

    def __init__(self, wave_size: int = 10, edges: Sequence[int] = (64, 256, 1024)) -> None:
        self.wave_size = wave_size
        self.edges = tuple(edges)
        self.open: tuple[str, str, int] | None = None  # (model, backend, bucket)
        self.members = 0

    def _joins(self, request: ProxyRequest) -> str | None:
        if self.open is None or self.members >= self.wave_size:
            return None
        model, backend, bucket = self.open
        if model != request.model or bucket != length_bucket(request, self.edges):
            return None
        return backend

    def score(self, request: ProxyRequest, backend: BackendState, snapshot: Snapshot) -> float:
        return 1.0 if self._joins(request) == backend.name else 0.0

    def chosen(self, request: ProxyRequest, backend: BackendState) -> None:
        if self._joins(request) == backend.name:
            self.members += 1
        else:
            self.open = (request.model, backend.name, length_bucket(request, self.edges))
            self.members = 1


class UELLMParams(QueuedParams, forbid_unknown_fields=True):
    length_weight: float = 0.5
    tpot_s: float = 0.03  # seconds per output token that turns a predicted length into time
    wave_size: int = 10
    wave_weight: float = 1.0


def build(params: UELLMParams) -> Policy:
    return Policy(
        "uellm",
        ordering=lambda: slo_length_order(params.length_weight, params.tpot_s),
        admission=BudgetAdmission(params.kv_limit, params.reserve),
        scorers=[(LeastLoad(), params.least_load_weight), (WaveAffinity(params.wave_size), params.wave_weight)],
        fleet=EvictForUrgent(params.evict_margin_s) if params.evict else None,
        uses_predictions=True,
    )


UELLM = PolicySpec(
    "uellm",
    UELLMParams,
    build,
    "Ordered by deadline + 0.5 x predicted decode time; waves of one length bucket go to the same instance.",
)
