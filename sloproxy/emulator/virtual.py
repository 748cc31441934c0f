"""Drive an :class:`~.engine.Engine` in virtual time: no sockets, no sleeping.

Used by the calibration benchmark (closed-loop concurrency sweeps, the way ``vllm bench
serve --max-concurrency`` measures) and by tests of engine behaviour.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .engine import Engine, Sequence
from .tokens import block_hashes


@dataclass(frozen=True, slots=True)
class RunSummary:
    requests: int
    duration_s: float
    output_tokens_per_s: float
    mean_ttft_s: float
    median_ttft_s: float
    mean_tpot_s: float  # per request: (e2e - ttft) / (output - 1), averaged
    preemptions: int


_ids = itertools.count()


def make_sequence(
    engine: Engine, prompt_tokens: int, output_tokens: int, arrival: float, *, unique: bool = True, priority: int = 0
) -> Sequence:
    """A request with ``ignore_eos`` semantics: exactly ``output_tokens`` tokens."""
    number = next(_ids)
    rid = f"v{number}"
    # A distinct first token makes every block hash of the chain distinct, unless asked to share.
    base = number if unique else 0
    ids = [(base + i * 7919) % 128_000 for i in range(prompt_tokens)]
    return Sequence(
        rid=rid,
        prompt_len=prompt_tokens,
        block_hashes=block_hashes(ids, engine.kv.block_size),
        target_tokens=output_tokens,
        hit_limit=True,
        max_new_tokens=output_tokens,
        priority=priority,
        arrival=arrival,
    )


def run_until_idle(engine: Engine, now: float = 0.0, limit_steps: int = 10_000_000) -> float:
    for _ in range(limit_steps):
        step = engine.plan_step(now)
        if step is None:
            return now
        engine.complete_step()
        now = step.end
    raise RuntimeError("engine did not drain")


def step_until_done(
    engine: Engine, in_flight: list[Sequence], now: float, on_finished: Callable[[Sequence, float], None]
) -> float:
    """Step ``engine`` until ``in_flight`` is empty; each request that ends leaves the list and goes to
    ``on_finished(seq, now)``, which may issue more (closed loops). Returns the time it ended."""
    while in_flight:
        step = engine.plan_step(now)
        if step is None:
            raise RuntimeError("engine stalled with requests in flight")
        engine.complete_step()
        now = step.end
        for seq in [s for s in in_flight if s.finished]:
            in_flight.remove(seq)
            on_finished(seq, now)
    return now


def closed_loop(
    engine: Engine, *, concurrency: int, requests: int, prompt_tokens: int, output_tokens: int
) -> RunSummary:
    """Keep ``concurrency`` requests in flight until ``requests`` have completed."""
    now = 0.0
    issued = 0
    done: list[Sequence] = []
    in_flight: list[Sequence] = []

    def issue(at: float) -> None:
        nonlocal issued
        seq = make_sequence(engine, prompt_tokens, output_tokens, at)
        engine.add(seq)
        in_flight.append(seq)
        issued += 1

    for _ in range(min(concurrency, requests)):
        issue(now)
    preempt_before = engine.stats.preemptions

    def finished(seq: Sequence, at: float) -> None:
        done.append(seq)
        if issued < requests:
            issue(at)

    now = step_until_done(engine, in_flight, now, finished)
    return summarise(done, now, engine.stats.preemptions - preempt_before)


def summarise(done: list[Sequence], end: float, preemptions: int) -> RunSummary:
    start = min(s.arrival for s in done)
    ttfts = [s.token_times[0] - s.arrival for s in done]
    tpots = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in done if len(s.token_times) > 1]
    tokens = sum(s.output for s in done)
    return RunSummary(
        requests=len(done),
        duration_s=end - start,
        output_tokens_per_s=tokens / (end - start),
        mean_ttft_s=statistics.fmean(ttfts),
        median_ttft_s=statistics.median(ttfts),
        mean_tpot_s=statistics.fmean(tpots) if tpots else 0.0,
        preemptions=preemptions,
    )
