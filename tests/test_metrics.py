"""/metrics: parses with prometheus_client's own parser, and the counters move as requests flow.

Also the SLO judgement (slo_outcome.py) on hand-made requests: the rules the attainment counters
and the ``sloproxy.slo.met`` span attribute share.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sloproxy.app import Proxy, build_server
from sloproxy.config import parse_config
from sloproxy.errors import ProxyError
from sloproxy.processes import EmulatorProcess
from sloproxy.request import parse_request
from sloproxy.slo import SLOClass
from sloproxy.slo_outcome import rejection_reason, slo_met

INTERACTIVE = SLOClass("interactive", ttft_s=1.0, tpot_s=0.1)
BATCH = SLOClass("batch", deadline_s=10.0, band=1, sheddable=True)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me about queues."}]}


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    with EmulatorProcess([{"name": "good", "engine": "vllm", "model": "m"}], speedup=20.0) as running:
        yield running


@asynccontextmanager
async def proxy_in_loop(config: dict[str, Any]) -> AsyncIterator[str]:
    proxy = Proxy(parse_config({"predictor": {"mode": "off"}, **config}))
    assert proxy.tracing is None  # the default: no tracing work on the request path
    server = build_server(proxy)
    await proxy.start()
    await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop(1.0)
        await proxy.stop()


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, through prometheus_client's own text parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def get_metrics(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return scrape(await response.text())


async def test_counters_move_as_requests_flow(fleet):
    config = {"backends": [{"name": "good", "engine": "vllm", "url": fleet.url("good"), "models": ["m"]}]}
    config["policy"] = {"name": "round-robin"}
    async with proxy_in_loop(config) as url, aiohttp.ClientSession() as session:
        before = await get_metrics(session, url)
        interactive = {"model": "m", "slo_class": "interactive"}
        assert value(before, "sloproxy_requests_total", **interactive, outcome="ok") == 0
        for stream in (True, True, False):
            body = {**CHAT, "stream": stream, "max_tokens": 8}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()
        async with session.post(
            url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-slo-class": "batch"}
        ) as response:
            assert response.status == 200
            await response.read()
        rejected = [
            ({**CHAT, "model": "nope"}, {}, 404),  # no such model: rejected by the scheduler
            (CHAT, {"x-slo-class": "platinum"}, 400),  # unknown class: rejected at classification
            ({"model": "m"}, {}, 400),  # no messages: rejected at parsing
        ]
        for body, headers, status in rejected:
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status == status
        after = await get_metrics(session, url)

    batch = {"model": "m", "slo_class": "batch"}
    assert value(after, "sloproxy_requests_total", **interactive, outcome="ok") == 3
    assert value(after, "sloproxy_requests_total", **batch, outcome="ok") == 1
    # 20x emulation meets both classes comfortably: attainment 1 (met / evaluated).
    assert value(after, "sloproxy_slo_evaluated_total", **interactive) == 3
    assert value(after, "sloproxy_slo_met_total", **interactive) == 3
    assert value(after, "sloproxy_slo_met_total", **batch) == value(after, "sloproxy_slo_evaluated_total", **batch) == 1
    # TTFT and TPOT only for the streamed ones; end to end and queue wait for all.
    assert value(after, "sloproxy_time_to_first_token_seconds_count", **interactive) == 2
    assert value(after, "sloproxy_time_per_output_token_seconds_count", **interactive) == 2
    assert value(after, "sloproxy_request_duration_seconds_count", **interactive) == 3
    assert value(after, "sloproxy_request_duration_seconds_bucket", **interactive, le="+Inf") == 3
    assert value(after, "sloproxy_queue_wait_seconds_count", **interactive) == 3
    assert value(after, "sloproxy_request_duration_seconds_sum", **interactive) > 0
    # Rejections by reason; a model nobody serves is labelled "other" (client input mints no labels).
    other = {"model": "other", "slo_class": "interactive"}
    assert value(after, "sloproxy_rejections_total", **other, reason="model_not_found") == 1
    assert value(after, "sloproxy_requests_total", **other, outcome="http_404") == 1
    # Client errors (unknown model, unknown class, invalid body) are counted apart and not judged.
    assert value(after, "sloproxy_client_errors_total", **other) == 1
    assert value(after, "sloproxy_slo_evaluated_total", **other) == value(after, "sloproxy_slo_met_total", **other) == 0
    assert value(after, "sloproxy_client_errors_total", **interactive) == 0
    assert value(after, "sloproxy_rejections_total", model="m", slo_class="none", reason="invalid_request") == 1
    assert value(after, "sloproxy_rejections_total", model="other", slo_class="none", reason="invalid_request") == 1
    assert value(after, "sloproxy_client_errors_total", model="m", slo_class="none") == 1
    assert value(after, "sloproxy_client_errors_total", model="other", slo_class="none") == 1
    # Tokens from the engines' usage, the backend as the proxy sees it.
    assert value(after, "sloproxy_tokens_total", model="m", kind="completion") > 0
    assert value(after, "sloproxy_backend_healthy", backend="good") == 1
    assert ("sloproxy_backend_in_flight_requests", frozenset({("backend", "good")})) in after
    assert value(after, "sloproxy_upstream_time_to_first_token_seconds_count", model="m") == 3
    assert value(after, "sloproxy_in_flight_requests") == 0


def test_evictions_and_predictor_error_are_counted():
    proxy = Proxy(
        parse_config({"backends": [{"name": "b", "engine": "vllm", "url": "http://127.0.0.1:9", "models": ["m"]}]})
    )
    metrics = proxy.metrics
    metrics.predicting = True
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    request.classify("default", INTERACTIVE)
    request.evictions = 2
    request.pred_p50, request.pred_p90 = 10.0, 30.0
    request.prompt_tokens, request.completion_tokens = 5, 20
    prior = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "y"}]}')
    prior.classify("default", INTERACTIVE)
    prior.pred_p50, prior.pred_p90, prior.estimate_source = 100.0, 300.0, "prior"  # not a prediction: not scored
    prior.prompt_tokens, prior.completion_tokens = 5, 20
    request.estimate_source = "model"
    assert metrics.finished(request, "ok", None, request.received_at + 0.5) is True
    metrics.finished(prior, "ok", None, prior.received_at + 0.5)
    samples = scrape(metrics.render().decode())
    key = {"model": "m", "slo_class": "interactive"}
    assert value(samples, "sloproxy_evictions_total", **key) == 2
    assert value(samples, "sloproxy_predictor_evaluated_total", **key) == 1
    assert value(samples, "sloproxy_predictor_within_p90_total", **key) == 1
    assert value(samples, "sloproxy_predictor_error_ratio_bucket", **key, le="1.5") == 0  # 20 / 10 = 2
    assert value(samples, "sloproxy_predictor_error_ratio_bucket", **key, le="2.0") == 1
    assert value(samples, "sloproxy_predictor_error_ratio_sum", **key) == 2.0


def _request(slo: SLOClass, *, stream: bool = True, tokens: int | None = 11):
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    request.stream = stream
    request.classify("default", slo)
    request.received_at = 100.0
    request.completion_tokens = tokens
    return request


def test_slo_judgement():
    streamed = _request(INTERACTIVE)
    streamed.first_token_at = 100.9  # TTFT 0.9 s <= 1.0
    assert slo_met(streamed, "ok", 101.9) is True  # 10 tokens after the first in 1.0 s: TPOT 0.1
    assert slo_met(streamed, "ok", 102.0) is False  # TPOT 0.11
    streamed.first_token_at = 101.1
    assert slo_met(streamed, "ok", 101.5) is False  # TTFT 1.1 s
    plain = _request(INTERACTIVE, stream=False)  # not streamed: within ttft + tpot * (tokens - 1) = 2.0 s
    assert slo_met(plain, "ok", 101.9) is True and slo_met(plain, "ok", 102.1) is False
    batch = _request(BATCH)
    assert slo_met(batch, "ok", 109.0) is True and slo_met(batch, "ok", 111.0) is False
    assert slo_met(batch, "http_429", 100.1) is False  # rejected: a miss
    # A client that left: judged only if a target was already missed.
    left = _request(INTERACTIVE)
    assert slo_met(left, "client_disconnected", 100.5) is None
    assert slo_met(left, "client_disconnected", 101.5) is False  # no first token after 1.5 s
    unclassified = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    assert slo_met(unclassified, "ok", 1.0) is None


def test_client_errors_are_counted_apart_and_misses_are_judged():
    """Live counting of the one SLO rule (tests/test_slo_rule.py): a 4xx other than 408/429 is a client
    error (its own counter, outside attainment); refusals, timeouts and failures are judged misses."""
    proxy = Proxy(
        parse_config({"backends": [{"name": "b", "engine": "vllm", "url": "http://127.0.0.1:9", "models": ["m"]}]})
    )
    metrics = proxy.metrics
    outcomes = {
        "http_400": ProxyError(400, "too long", code="context_length_exceeded"),
        "http_401": ProxyError(401, "bad key"),
        "http_429": ProxyError(429, "full", code="queue_full"),
        "http_503": ProxyError(503, "none"),
        "http_504": ProxyError(504, "slow"),
        "http_502": ProxyError(502, "broken"),
    }
    verdicts = {}
    for outcome, error in outcomes.items():
        request = _request(INTERACTIVE)
        verdicts[outcome] = metrics.finished(request, outcome, error, request.received_at + 0.2)
    assert metrics.finished(None, "http_401", ProxyError(401, "no key"), 1.0) is None  # before parsing
    assert verdicts == {
        "http_400": None,
        "http_401": None,
        "http_429": False,
        "http_503": False,
        "http_504": False,
        "http_502": False,
    }
    samples = scrape(metrics.render().decode())
    key = {"model": "m", "slo_class": "interactive"}
    assert value(samples, "sloproxy_client_errors_total", **key) == 2
    assert value(samples, "sloproxy_slo_evaluated_total", **key) == 4
    assert value(samples, "sloproxy_slo_met_total", **key) == 0
    assert value(samples, "sloproxy_client_errors_total", model="other", slo_class="none") == 1


def test_rejection_reasons_are_bounded():
    assert rejection_reason(ProxyError(429, "full", code="queue_full")) == "queue_full"
    assert rejection_reason(ProxyError(400, "bad")) == "invalid_request"
    assert rejection_reason(ProxyError(503, "none")) == "no_backend"
    assert rejection_reason(ProxyError(418, "teapot")) == "http_418"


def test_deploy_files_use_metrics_the_proxy_exports():
    import json
    import re
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    dashboard = json.loads((deploy / "grafana" / "sloproxy-dashboard.json").read_text())
    for name in ("prometheus/prometheus.yml", "prometheus/sloproxy_rules.yml", "otel-collector/otel-collector.yaml"):
        assert yaml.safe_load((deploy / name).read_text())
    proxy = Proxy(
        parse_config({"backends": [{"name": "b", "engine": "vllm", "url": "http://127.0.0.1:9", "models": ["m"]}]})
    )
    proxy.metrics.predicting = True
    exported = {family.name for family in text_string_to_metric_families(proxy.metrics.render().decode())}
    exported |= {"sloproxy_scheduler_events"}  # only once the scheduler counted an event
    used = set(re.findall(r"sloproxy_[a-z0-9_]+", json.dumps(dashboard)))
    assert len(used) > 15
    for name in used:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert base in exported, name
