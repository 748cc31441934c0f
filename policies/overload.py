"""Refusing the longest work first when a model is past its capacity.

Past a model's capacity some requests miss whatever the order. Which ones decides how many meet
their SLO: a reply predicted to run long holds an engine slot for all of its tokens, slots the
queued short requests wait for. Refusing the longest predicted share of the interactive work that
has to queue (429 with Retry-After, at once) serves more requests on time than letting every one
in and missing the targets of whichever come last (Moore and Hodgson's rule for the fewest late
jobs on one machine drops the longest job when the next one would be late).

Measured in the simulator (``bench/policy_capacity.py``'s fleet and conv workload at x1.125, the
qwen side, 336 requests on two A10s over capacity): ``slo`` met 173; refusing the 20% of the
interactive requests with the longest *predicted* replies before the run met 235 (the true longest
20%: 243); refusing the longest 40% of the batch requests met 196. Long interactive work is what
crowds the rest out: it is served first and holds its slots longest.

The share refused is fed back from outcomes, per model (the scheduler reports them): a miss (an
interactive first token past its target, interactive work refused as an overrun, sheddable work
shed for its deadline) raises it by ``step``; a success (an interactive first token on time,
sheddable work dispatched) lowers it by ``step * target / (1 - target)``. It settles where about
``target`` of the outcomes are misses and stays at 0 while the fleet keeps up. Only work that has
to queue is judged: a request the fleet can place on arrival never is.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest

MIN_SAMPLE = 20  # queued interactive requests seen before a threshold means anything


class _ModelGate:
    __slots__ = ("recent", "share", "sorted")

    def __init__(self, window: int) -> None:
        self.share = 0.0  # the longest share of queued interactive work refused now
        self.recent: deque[int] = deque(maxlen=window)  # predicted reply lengths, arrival order
        self.sorted: list[int] = []  # the same, sorted (for the threshold)


class LongestFirstRefusal:
    """Per model: refuse queued interactive work whose predicted reply is among the longest ``share``
    of the model's last ``window`` queued interactive requests."""

    def __init__(self, target: float = 0.1, step: float = 0.02, share_max: float = 0.5, window: int = 200) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError("refuse_longest_target must be between 0 and 1")
        if step <= 0.0 or not 0.0 < share_max <= 1.0 or window < MIN_SAMPLE:
            raise ValueError(
                "refuse_longest_step must be positive, refuse_longest_share_max in (0, 1], "
                f"and the window at least {MIN_SAMPLE}"
            )
        self.target = target
        self.step = step
        self.relief = step * target / (1.0 - target)
        self.share_max = share_max
        self.window = window
        self._models: dict[str, _ModelGate] = {}

    def _gate(self, model: str) -> _ModelGate:
        gate = self._models.get(model)
        if gate is None:
            gate = self._models[model] = _ModelGate(self.window)
        return gate

    def share(self, model: str) -> float:
        gate = self._models.get(model)
        return gate.share if gate is not None else 0.0

    def refuses(self, request: ProxyRequest) -> bool:
        """Judge interactive work about to queue: True if its predicted reply is among the longest
        ``share`` of the model's recent queued interactive work."""
        gate = self._gate(request.model)
        tokens = request.est_output_tokens
        if len(gate.recent) == gate.recent.maxlen:
            gate.sorted.pop(bisect.bisect_left(gate.sorted, gate.recent[0]))
        gate.recent.append(tokens)
        bisect.insort(gate.sorted, tokens)
        if gate.share <= 0.0 or len(gate.sorted) < MIN_SAMPLE:
            return False
        threshold = gate.sorted[min(len(gate.sorted) - 1, int((1.0 - gate.share) * len(gate.sorted)))]
        return tokens > threshold

    def outcome(self, model: str, met: bool) -> None:
        """A request of ``model`` met its target (or was dispatched in time), or missed it (or was shed)."""
        gate = self._gate(model)
        if met:
            gate.share = max(0.0, gate.share - self.relief)
        else:
            gate.share = min(self.share_max, gate.share + self.step)
