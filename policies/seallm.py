"""SeaLLM's ordering as far as a proxy reaches: shortest normalised remaining time first, with
budgets that double per level (a multi-level queue whose levels come from reply lengths).

SeaLLM (arXiv 2504.15720) ranks requests by estimated remaining time / standalone execution time and
gives each request a time budget from its service's profile; past it, the request drops a level and
its budget doubles. From outside the engine the proxy orders only work it still holds: a request's
level is how many doublings of the model's budget its predicted reply needs (the budget itself is
the model's median reply, learned from the token counts of replies streamed back), and inside a
level the queue runs by normalised deadline ``arrival + stretch x standalone time``, which is the
order in which the requests' normalised latency would reach ``stretch`` if they kept waiting.
Demoting work already decoding inside an engine needs engine preemption and is not done.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .base import Ordering, Policy, PolicySpec
from .orderings import HeapOrdering
from .parts import BudgetAdmission, EvictForUrgent, LeastLoad
from .presets import QueuedParams

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest


class ServiceProfile:
    """Per-model reply lengths from finished requests (streamed token counts): the level-0 budget is
    their running median; until ``min_samples`` arrive it is ``initial_tokens``."""

    def __init__(self, initial_tokens: int = 128, window: int = 512, min_samples: int = 20) -> None:
        self.initial = initial_tokens
        self.min_samples = min_samples
        self._seen: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=window))
        self._median: dict[str, float] = {}

    def record(self, model: str, tokens: int) -> None:
        seen = self._seen[model]
        seen.append(tokens)
        if len(seen) >= self.min_samples and len(seen) % 8 == 0:  # recompute now and then: O(window log window)
            ordered = sorted(seen)
            self._median[model] = float(ordered[len(ordered) // 2])

    def budget(self, model: str) -> float:
        return max(1.0, self._median.get(model, float(self.initial)))


def level(predicted_tokens: float, budget: float) -> int:
    """How many times the budget doubles before it covers the reply: 0 while it fits."""
    if predicted_tokens <= budget:
        return 0
    return math.ceil(math.log2(predicted_tokens / budget))


class SeaLLMOrdering(Ordering):
    """Band, then level, then normalised deadline; the profile learns from served requests."""

    restores_removed_head = True  # a HeapOrdering inside

    def __init__(self, profile: ServiceProfile, stretch: float, prefill_s: float, tpot_s: float) -> None:
        self.profile = profile
        self.stretch = stretch
        self.prefill_s = prefill_s
        self.tpot_s = tpot_s
        self._heap = HeapOrdering(self.key)

    def standalone_s(self, request: ProxyRequest) -> float:
        return request.est_prompt_tokens * self.prefill_s + request.est_output_tokens * self.tpot_s

    def key(self, request: ProxyRequest) -> tuple:
        lvl = level(request.est_output_tokens, self.profile.budget(request.model))
        return (request.band, lvl, request.received_at + self.stretch * self.standalone_s(request))

    def push(self, request: ProxyRequest) -> None:
        self._heap.push(request)

    def peek(self) -> ProxyRequest | None:
        return self._heap.peek()

    def pop(self) -> ProxyRequest:
        return self._heap.pop()

    def remove(self, request: ProxyRequest) -> bool:
        return self._heap.remove(request)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[ProxyRequest]:
        return iter(self._heap)

    def served(self, request: ProxyRequest, tokens: int) -> None:
        if request.completion_tokens is not None:
            self.profile.record(request.model, request.completion_tokens)


class SeaLLMParams(QueuedParams, forbid_unknown_fields=True):
    stretch: float = 4.0  # normalised latency at which requests are compared
    initial_budget_tokens: int = 128  # level-0 budget until the profile has min_samples replies
    min_samples: int = 20
    prefill_s_per_token: float = 0.0002  # standalone time model: prompt tokens x this + reply tokens x tpot
    tpot_s: float = 0.03


def build(params: SeaLLMParams) -> Policy:
    profile = ServiceProfile(params.initial_budget_tokens, min_samples=params.min_samples)
    return Policy(
        "seallm",
        ordering=lambda: SeaLLMOrdering(profile, params.stretch, params.prefill_s_per_token, params.tpot_s),
        admission=BudgetAdmission(params.kv_limit, params.reserve),
        scorers=[(LeastLoad(), params.least_load_weight)],
        fleet=EvictForUrgent(params.evict_margin_s) if params.evict else None,
        uses_predictions=True,
    )


SEALLM = PolicySpec(
    "seallm",
    SeaLLMParams,
    build,
    "Shortest normalised time first, in levels of doubling per-model budgets learned from streamed replies.",
)
