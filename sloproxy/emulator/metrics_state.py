"""Counters and histograms an emulated engine keeps, in emulated seconds.

Kept as plain numbers on the hot path; each engine's ``/metrics`` route renders them under
that engine's real metric names at scrape time (see :mod:`.metrics_text`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Sequence

# vLLM's own bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class Histogram:
    """Cumulative-on-render histogram: per-bucket counts, a sum and a count."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``, as Prometheus exposes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append((str(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


class EngineStats:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.steps = 0
        self.busy_seconds = 0.0
        self.finished: Counter[str] = Counter()
        self.requests_received = 0
        self.rejected: Counter[str] = Counter()  # by error type, for engines that count failures
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.num_waiting = 0
        self.peak_in_engine = 0  # most requests inside at once (running + waiting): test checks of budgets
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.prompt_len = Histogram(TOKEN_BUCKETS)
        self.generation_len = Histogram(TOKEN_BUCKETS)
        self.time_per_token = Histogram(ITL_BUCKETS)

    def waiting_changed(self, waiting: int) -> None:
        self.num_waiting = waiting

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def record_finish(self, seq: Sequence, now: float) -> None:
        self.finished[seq.finish_reason or "stop"] += 1
        self.e2e.observe(now - seq.arrival)
        self.prompt_len.observe(seq.prompt_len)
        self.generation_len.observe(seq.output)
        times = seq.token_times
        if times:
            self.ttft.observe(times[0] - seq.arrival)
            for earlier, later in pairwise(times):
                self.itl.observe(later - earlier)
            if len(times) > 1:
                self.time_per_token.observe((times[-1] - times[0]) / (len(times) - 1))
