"""The circuit breaker without servers: ejection, half-open trials, back-off, never a model's last backends."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from sloproxy.backends import Backend, BackendPool
from sloproxy.config import BackendConfig, ConfigError, HealthConfig, LoadPolling, OutlierConfig, parse_config
from sloproxy.outlier import OutlierDetector
from sloproxy.plugins import load_policy
from sloproxy.request import parse_request
from sloproxy.scheduler import Scheduler
from sloproxy.scheduler_config import SchedulingConfig
from sloproxy.slo import DEFAULT_CLASSES


def pool_of(*names: str) -> BackendPool:
    configs = [BackendConfig(name=n, engine="vllm", url="http://127.0.0.1:9", models=["m"]) for n in names]
    return BackendPool(configs, HealthConfig(), LoadPolling())


def detector(pool: BackendPool, **config) -> OutlierDetector:
    defaults = {"consecutive_failures": 3, "base_ejection_s": 0.05, "max_ejection_s": 0.2, "half_open_requests": 2}
    return OutlierDetector(OutlierConfig(**{**defaults, **config}), pool)


def fail(outlier: OutlierDetector, backend: Backend, times: int = 1) -> None:
    for _ in range(times):
        outlier.record(backend, 0, False, "test")


def routable(pool: BackendPool) -> list[str]:
    return [b.name for b in pool.candidates("m")]


async def test_consecutive_failures_eject_and_successes_reset_the_count() -> None:
    pool = pool_of("a", "b")
    outlier = detector(pool)
    a = pool.backends[0]
    fail(outlier, a, 2)
    outlier.record(a, 0, True)  # a success in between: the count starts over
    fail(outlier, a, 2)
    outlier.record(a, 0, None)  # a 4xx or a client gone says nothing either way
    assert routable(pool) == ["a", "b"]
    fail(outlier, a)
    assert a.breaker is not None and a.breaker.state == "open" and routable(pool) == ["b"]
    outlier.stop()


async def test_half_open_trials_then_closed() -> None:
    pool = pool_of("a", "b")
    outlier = detector(pool)
    a = pool.backends[0]
    breaker = a.breaker
    assert breaker is not None
    fail(outlier, a, 3)
    await asyncio.sleep(0.08)
    assert breaker.state == "half_open" and routable(pool) == ["a", "b"]
    fail(outlier, a)  # a straggler from before the ejection, not a trial: no verdict
    assert breaker.state == "half_open"
    breaker.trial_started(1)
    assert routable(pool) == ["a", "b"]
    breaker.trial_started(2)
    assert routable(pool) == ["b"]  # both trial slots out
    outlier.record(a, 1, None)  # a trial without a verdict frees its slot
    assert routable(pool) == ["a", "b"]
    outlier.record(a, 2, True)
    assert breaker.state == "closed" and not breaker.trials and routable(pool) == ["a", "b"]
    outlier.stop()


async def test_a_failed_trial_ejects_again_for_twice_as_long_up_to_the_max() -> None:
    pool = pool_of("a", "b")
    outlier = detector(pool, base_ejection_s=0.04, max_ejection_s=0.1)
    a = pool.backends[0]
    breaker = a.breaker
    assert breaker is not None
    fail(outlier, a, 3)
    lengths = []
    for _ in range(3):
        assert breaker.ejected_until is not None
        lengths.append(breaker.ejected_until - outlier.clock())
        await asyncio.sleep(breaker.ejected_until - outlier.clock() + 0.02)
        assert breaker.state == "half_open"
        breaker.trial_started(7)
        outlier.record(a, 7, False, "still broken")
    assert [round(x, 2) for x in lengths] == [0.04, 0.08, 0.1]
    assert breaker.total_ejections == 4
    outlier.stop()


async def test_never_ejects_more_than_the_fraction_nor_the_last_backend() -> None:
    pool = pool_of("a", "b", "c")
    outlier = detector(pool, max_ejected_fraction=0.5)
    a, b, _ = pool.backends
    fail(outlier, a, 3)
    fail(outlier, b, 3)  # 2 of 3 would be over half
    assert routable(pool) == ["b", "c"]
    assert b.breaker is not None and b.breaker.refused == 1 and b.breaker.state == "closed"
    outlier.stop()

    pool = pool_of("a", "b")
    outlier = detector(pool, max_ejected_fraction=1.0)
    a, b = pool.backends
    b.probe_healthy = False  # the health checks already took b out
    b.update_routable()
    fail(outlier, a, 5)
    assert routable(pool) == ["a"]  # a is all that is left: it stays in, failing or not
    assert a.breaker is not None and a.breaker.refused == 3
    outlier.stop()


async def test_the_scheduler_marks_trials_and_release_frees_an_unreported_one() -> None:
    pool = pool_of("a", "b")
    outlier = detector(pool, half_open_requests=1)
    scheduler = Scheduler(load_policy("round-robin"), pool, SchedulingConfig(budget_initial=4))
    a = pool.backends[0]
    breaker = a.breaker
    assert breaker is not None
    fail(outlier, a, 3)
    await asyncio.sleep(0.08)
    assert breaker.state == "half_open"
    placed = []
    for _ in range(3):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        request = parse_request("chat", msgspec.json.encode(body))
        request.classify("t", DEFAULT_CLASSES[0])
        placed.append((request, await scheduler.acquire(request)))
    assert [backend.name for _, backend in placed].count("a") == 1  # one trial slot: one request on a
    trial = next(request for request, backend in placed if backend is a)
    assert breaker.trials == {id(trial)} and routable(pool) == ["b"]
    scheduler.release(trial, a)  # its caller went away before reporting anything
    assert not breaker.trials and routable(pool) == ["a", "b"]
    for request, backend in placed:
        scheduler.release(request, backend)
    assert (a.in_flight, a.kv_reserved_tokens) == (0, 0)
    outlier.stop()


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("outlier", "consecutive_failures", 0),
        ("outlier", "half_open_requests", 0),
        ("outlier", "base_ejection_s", 0),
        ("outlier", "max_ejection_s", 1),  # under base_ejection_s (10)
        ("outlier", "max_ejected_fraction", 1.5),
        ("limits", "first_byte_timeout_s", 0),
    ],
)
def test_config_errors_name_the_field(section: str, field: str, value: float) -> None:
    raw = {"backends": [{"name": "a", "engine": "vllm", "url": "http://x:1", "models": ["m"]}], section: {field: value}}
    with pytest.raises(ConfigError, match=rf"\$\.{section}\.{field}"):
        parse_config(raw)


def test_config_rejects_unknown_outlier_fields() -> None:
    raw = {"backends": [{"name": "a", "engine": "vllm", "url": "http://x:1", "models": ["m"]}], "outlier": {"x": 1}}
    with pytest.raises(ConfigError, match=r"outlier"):
        parse_config(raw)
