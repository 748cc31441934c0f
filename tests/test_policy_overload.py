"""Longest-first refusal (policies/overload.py): pure decisions, then the scheduler acting on them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from sloproxy.errors import ProxyError
from sloproxy.policies.overload import LongestFirstRefusal
from tests.test_scheduler import request, scheduler


def queued(model: str, tokens: int) -> SimpleNamespace:
    return SimpleNamespace(model=model, est_output_tokens=tokens)


def fill(refusal: LongestFirstRefusal, model: str = "m", n: int = 100) -> list[bool]:
    """n queued requests predicted at 1..n tokens: which were refused."""
    return [refusal.refuses(queued(model, tokens)) for tokens in range(1, n + 1)]


def test_nothing_is_refused_while_the_first_token_targets_hold() -> None:
    refusal = LongestFirstRefusal(target=0.1, step=0.05)
    assert not any(fill(refusal))
    for _ in range(50):
        refusal.outcome("m", True)
    assert not any(fill(refusal)) and refusal.share("m") == 0.0


def test_misses_refuse_the_longest_predicted_share_and_only_that_model() -> None:
    refusal = LongestFirstRefusal(target=0.1, step=0.05)
    fill(refusal)  # 100 recent queued requests, 1..100 tokens
    for _ in range(4):
        refusal.outcome("m", False)
    assert refusal.share("m") == pytest.approx(0.2)
    assert refusal.refuses(queued("m", 95)) and refusal.refuses(queued("m", 85))
    assert not refusal.refuses(queued("m", 70)) and not refusal.refuses(queued("m", 5))
    assert not refusal.refuses(queued("other", 10_000))  # another model keeps its own share (0)


def test_met_targets_bring_the_share_back_down_where_about_target_miss() -> None:
    refusal = LongestFirstRefusal(target=0.1, step=0.05)
    fill(refusal)
    for _ in range(4):
        refusal.outcome("m", False)
    for _ in range(9):  # nine on time for each miss: `target` (10%) missing holds the share
        refusal.outcome("m", True)
    assert refusal.share("m") == pytest.approx(0.15)
    for _ in range(300):
        refusal.outcome("m", True)
    assert refusal.share("m") == 0.0 and not refusal.refuses(queued("m", 100))


def test_the_share_is_capped_and_needs_a_sample_first() -> None:
    refusal = LongestFirstRefusal(target=0.1, step=0.05, share_max=0.3)
    for _ in range(100):
        refusal.outcome("m", False)
    assert refusal.share("m") == pytest.approx(0.3)
    assert not any(fill(refusal, n=19))  # fewer than 20 seen: no threshold to judge by
    assert refusal.refuses(queued("m", 19)) and not refusal.refuses(queued("m", 5))
    for bad in ({"target": 1.0}, {"step": 0.0}, {"share_max": 1.5}, {"window": 10}):
        with pytest.raises(ValueError):
            LongestFirstRefusal(**bad)


async def test_past_capacity_slo_refuses_queued_interactive_work_predicted_to_run_longest() -> None:
    s = scheduler("slo", budget=1, refuse_overrun=False)
    first = request()
    backend = await s.acquire(first)  # holds the only slot: the rest queue
    waiting = []
    for tokens in range(10, 410, 20):  # 20 queued interactive requests, 10..390 tokens predicted
        r = request()
        r.est_output_tokens = tokens
        waiting.append(asyncio.ensure_future(s.acquire(r)))
    await asyncio.sleep(0)
    assert len(s.queues["m"]) == 20  # the fleet kept its targets so far: nothing refused
    first.urgent_deadline = s.clock() - 1.0
    for _ in range(6):
        s.first_token(first, backend)  # six late first tokens
    long_one, short_one = request(), request()
    long_one.est_output_tokens, short_one.est_output_tokens = 2000, 20
    with pytest.raises(ProxyError) as refused:
        await s.acquire(long_one)
    assert refused.value.status == 429 and refused.value.code == "over_capacity"
    assert refused.value.headers == {"Retry-After": "1"} and s.counts["longest_refused"] == 1
    waiting.append(asyncio.ensure_future(s.acquire(short_one)))
    batch = request(slo="batch")
    batch.est_output_tokens = 2000
    waiting.append(asyncio.ensure_future(s.acquire(batch)))  # sheddable work is judged by its deadline
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting) and len(s.queues["m"]) == 22
    share = s.policy.refusal.share("m")
    hopeless = request(slo="batch")
    hopeless.est_output_tokens = 4000  # 80 s at shed_tpot_s: past its 60 s deadline from the start
    with pytest.raises(ProxyError) as shed:
        await s.acquire(hopeless)
    assert shed.value.code == "deadline_exceeded"
    assert s.policy.refusal.share("m") == pytest.approx(share + 0.02)  # shed sheddable work is a miss too
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await s.stop()
