"""Decode runs (the simulator's fast path) are exactly per-iteration planning, cut or not."""

from __future__ import annotations

import heapq
import random

import pytest

from sloproxy.emulator.engine import Engine, Sequence
from sloproxy.emulator.profiles import get_profile
from sloproxy.emulator.tokens import block_hashes


def _arrivals(seed: int, count: int) -> list[tuple[float, int, int, list[int], int]]:
    rng = random.Random(seed)
    rate = 4.0 if seed == 1 else 0.8  # overloaded (preemptions, long queues) or light (long decode runs)
    now, out = 0.0, []
    for index in range(count):
        now += rng.expovariate(rate)
        prompt = rng.randint(20, 900)
        shared = rng.random() < 0.3  # some prompts share a prefix (prefix-cache hits and evictions)
        ids = [(7 if shared else index) * 31 + i for i in range(prompt)]
        out.append((now, prompt, rng.randint(1, 300), ids, rng.choice((0, 5, 20))))
    return out


def _drive(kind: str, runs: bool, seed: int, profile: str) -> tuple[list[tuple], tuple]:
    """Arrivals and 'polls' (touches every 0.37 s) on one engine; per-iteration or with runs."""
    engine = Engine(kind, get_profile(profile), priority_scheduling=kind != "tgi" and seed % 2 == 1)
    seqs: list[Sequence] = []
    events: list[tuple[float, int, int]] = []  # (time, kind 0=arrival 1=poll 2=step end, index)
    arrivals = _arrivals(seed, 120)
    for index, item in enumerate(arrivals):
        heapq.heappush(events, (item[0], 0, index))
    poll = 0.0
    while poll < arrivals[-1][0] + 200:
        heapq.heappush(events, (poll, 1, 0))
        poll += 0.37
    readings = []
    step_end: float | None = None
    while events:
        now, what, index = heapq.heappop(events)
        if what == 2:
            if engine.current is None or engine.current.end != now:
                continue  # superseded by a cut
            engine.complete_step()
            step_end = None
        else:
            if runs and engine.current is not None:
                step = engine.cut_run(now)
                if step is not None and step.end != step_end:
                    step_end = step.end
                    heapq.heappush(events, (step_end, 2, 0))
            if what == 0:
                at, prompt, output, ids, priority = arrivals[index]
                seq = Sequence(
                    rid=str(index),
                    prompt_len=prompt,
                    block_hashes=block_hashes(ids, engine.kv.block_size),
                    target_tokens=output,
                    hit_limit=False,
                    max_new_tokens=output + 50,
                    priority=priority,
                    arrival=at,
                )
                seqs.append(seq)
                engine.add(seq)
            else:
                readings.append((now, len(engine.running), len(engine.waiting), engine.kv.free))
                continue
        if engine.current is None:
            start = now
            step = engine.plan_run(start, poll_next(now)) if runs else engine.plan_step(start)
            if step is not None:
                step_end = step.end
                heapq.heappush(events, (step_end, 2, 0))
    stats = engine.stats
    per_seq = [(s.rid, s.token_times, s.finished_at, s.preemptions, s.cached_tokens) for s in seqs]
    totals = (stats.steps, stats.generation_tokens, stats.busy_seconds, stats.preemptions, engine.kv.free, readings)
    return per_seq, totals


def poll_next(now: float) -> float:
    return (int(now / 0.37) + 1) * 0.37


@pytest.mark.parametrize("kind", ["vllm", "sglang", "tgi"])
@pytest.mark.parametrize("seed", [1, 2])
def test_runs_equal_per_iteration_planning(kind: str, seed: int) -> None:
    # a small-KV profile so caches fill, blocks are evicted and vLLM / SGLang preempt
    profile = "a10-llama2-7b"
    assert _drive(kind, True, seed, profile) == _drive(kind, False, seed, profile)
