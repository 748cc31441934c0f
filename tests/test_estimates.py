"""Reply-length estimates in the request path: when the predictor runs, what it sets, what it learns."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest

from sloproxy.config import PredictorConfig
from sloproxy.estimates import LengthEstimates
from sloproxy.processes import EmulatorProcess, ProxyProcess
from sloproxy.request import DEFAULT_OUTPUT_TOKENS, parse_request


def chat(content: str, **fields) -> bytes:
    return msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": content}], **fields})


@pytest.fixture(scope="module")
def estimates() -> LengthEstimates:
    return LengthEstimates.from_config(PredictorConfig(mode="on"), policy_uses_predictions=False)


def test_auto_mode_predicts_only_for_policies_that_read_predictions():
    assert not LengthEstimates.from_config(PredictorConfig(), policy_uses_predictions=False).enabled
    assert LengthEstimates.from_config(PredictorConfig(), policy_uses_predictions=True).enabled
    assert not LengthEstimates.from_config(PredictorConfig(mode="off"), policy_uses_predictions=True).enabled


def test_estimate_sets_p50_p90_and_the_scheduling_estimate(estimates):
    essay = parse_request("chat", chat("Write a 1000-word essay on the history of Rome, with sections."))
    yes_no = parse_request("chat", chat("Is 7 a prime number? Answer yes or no."))
    for request in (essay, yes_no):
        estimates.predict(request)
        assert request.pred_p50 is not None and 1 <= request.pred_p50 <= request.pred_p90
        assert request.est_output_tokens == max(1, round(request.pred_p50))
    assert essay.pred_p50 > 2 * yes_no.pred_p50  # the prompt's wording moves the estimate


def test_estimate_respects_the_limit_and_ignore_eos(estimates):
    capped = parse_request("chat", chat("Write a long story about dragons.", max_tokens=5))
    estimates.predict(capped)
    assert capped.pred_p90 <= 5 and capped.est_output_tokens <= 5
    forced = parse_request("chat", chat("hi", max_tokens=700, ignore_eos=True))
    estimates.predict(forced)
    assert forced.pred_p50 == forced.pred_p90 == 700 and forced.est_output_tokens == 700


def test_arrival_sets_the_models_prior_and_waiting_sets_the_prompts_prediction(estimates):
    from sloproxy.slo import DEFAULT_CLASSES

    interactive = DEFAULT_CLASSES[0]
    essay = parse_request("chat", chat("Write a 1000-word essay on the history of Rome, with sections."))
    yes_no = parse_request("chat", chat("Is 7 a prime number? Answer yes or no."))
    for request in (essay, yes_no):
        estimates.prior(request)
        request.classify("t", interactive)
        assert request.estimate_source == "prior" and request.prediction is None
    assert (essay.pred_p50, essay.pred_p90) == (yes_no.pred_p50, yes_no.pred_p90)  # the model's, not the prompt's
    assert 1 <= essay.pred_p50 <= essay.pred_p90
    prior_deadline = essay.deadline
    for request in (essay, yes_no):
        estimates.predict(request)  # what the scheduler runs (before the queue, or once under way)
        assert request.estimate_source == "model" and request.prediction is not None
    assert essay.pred_p50 > 2 * yes_no.pred_p50
    assert essay.deadline == pytest.approx(essay.received_at + interactive.budget_s(essay.est_output_tokens))
    assert essay.deadline != prior_deadline  # the deadline moved with the estimate
    capped = parse_request("chat", chat("Write a long story.", max_tokens=3))
    estimates.prior(capped)
    assert capped.pred_p90 <= 3


def test_without_a_predictor_the_request_keeps_its_own_guess():
    request = parse_request("chat", chat("hi"))
    LengthEstimates(None).predict(request)
    assert request.pred_p50 is None and request.est_output_tokens == DEFAULT_OUTPUT_TOKENS


def test_finished_replies_become_samples_unless_cut_or_abandoned():
    learner_estimates = LengthEstimates.from_config(PredictorConfig(mode="on"), policy_uses_predictions=True)
    store = learner_estimates.learner.store
    finished = parse_request("chat", chat("Explain TCP slow start.", max_tokens=500))
    cut = parse_request("chat", chat("Explain TCP slow start.", max_tokens=50))
    gone = parse_request("chat", chat("Explain TCP slow start."))
    for request, tokens in ((finished, 120), (cut, 50), (gone, 30)):
        learner_estimates.predict(request)
        request.completion_tokens = tokens
    gone.disconnected = True
    for request in (finished, cut, gone):
        learner_estimates.finished(request)
    assert len(store) == 1
    figures = learner_estimates.metrics()
    assert figures["store_samples"] == 1.0 and figures["live_mae_tokens"] == pytest.approx(abs(finished.pred_p50 - 120))


async def _metrics_after_traffic(policy: str) -> str:
    instance = {"name": "v", "engine": "vllm", "model": "m", "profile": "h100-llama3-8b"}
    with EmulatorProcess([instance], speedup=20.0) as fleet:
        config = {
            "backends": [{"name": "v", "engine": "vllm", "url": fleet.url("v"), "models": ["m"]}],
            "policy": {"name": policy},
        }
        with ProxyProcess(config) as proxy:
            async with aiohttp.ClientSession() as session:

                async def one(index: int) -> None:
                    body = {"model": "m", "messages": [{"role": "user", "content": f"Tell me about {index}."}]}
                    async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                        assert response.status == 200

                await asyncio.gather(*(one(i) for i in range(6)))
                async with session.get(proxy.url + "/metrics") as response:
                    return await response.text()


async def test_live_proxy_learns_from_replies_with_a_queued_policy_only():
    text = await _metrics_after_traffic("edf")
    assert "sloproxy_predictor_store_samples 6.0" in text
    assert "sloproxy_predictor_live_p90_coverage" in text
    assert "sloproxy_predictor_" not in await _metrics_after_traffic("round-robin")
