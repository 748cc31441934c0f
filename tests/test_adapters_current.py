"""The adapters against what today's engines send (vLLM 0.33, SGLang 0.5.23, TGI 3.3): load pages, in-stream
errors, finish reasons, error fields. The engines' sources are cited in tests/test_contract_*.py."""

from __future__ import annotations

import json

import pytest

from sloproxy.adapters.openai_compat import OpenAICompatibleAdapter
from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.adapters.tgi import TGIAdapter, TGIStream
from sloproxy.adapters.vllm import VLLMAdapter
from sloproxy.request import parse_request

SGLANG_PRIORITY_METRICS = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",priority="",tp_rank="0"} 6.0
sglang:num_running_reqs{engine_type="unified",model_name="m",priority="0",tp_rank="0"} 4.0
sglang:num_running_reqs{engine_type="unified",model_name="m",priority="1",tp_rank="0"} 2.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="m",priority="",tp_rank="0"} 3.0
sglang:num_queue_reqs{engine_type="unified",model_name="m",priority="0",tp_rank="0"} 3.0
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="m",tp_rank="0"} 0.25
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{engine_type="unified",model_name="m",tp_rank="0"} 200000.0
"""

VLLM_DP_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:num_requests_running{engine="1",model_name="m"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",kv_cache_size_tokens="123456",num_gpu_blocks="7716"} 1.0
"""

# vLLM with --disable-log-stats: /metrics answers 200 with the process families only
NO_ENGINE_METRICS = """\
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.0
"""


def test_sglang_priority_breakdown_is_not_counted_twice() -> None:
    load = SGLangAdapter().parse_load(SGLANG_PRIORITY_METRICS)
    assert load is not None
    assert (load.running, load.waiting) == (6, 3)  # the priority="" totals, not totals + breakdown
    assert load.kv_capacity_tokens == 200000 and load.kv_usage == 0.25


def test_vllm_data_parallel_ranks_add_up_and_kv_usage_is_the_fullest_rank() -> None:
    load = VLLMAdapter().parse_load(VLLM_DP_METRICS)
    assert load is not None
    assert (load.running, load.waiting) == (12, 1)
    assert load.kv_usage == 0.75  # max over ranks, not 1.25
    assert load.kv_capacity_tokens == 123456  # the kv_cache_size_tokens label


@pytest.mark.parametrize("adapter", [VLLMAdapter(), SGLangAdapter(), TGIAdapter()], ids=lambda a: a.engine)
def test_a_page_without_load_figures_is_load_unknown_not_zero(adapter) -> None:
    assert adapter.parse_load(NO_ENGINE_METRICS) is None


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ("Model is overloaded", 429),  # retried elsewhere before the first byte
        ("Input validation error: `inputs` must have less than 4095 tokens. Given: 5000", 400),
        ("Template error: template not found", 400),
        ("Request failed during generation: CUDA error", 500),
        ("Incomplete generation", 500),
    ],
)
def test_tgi_in_stream_errors_are_classified_by_message(message: str, status: int) -> None:
    """TGI's OpenAI streams answer HTTP 200 and send every inference error as one event with
    http_status_code 422, whatever went wrong."""
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}')
    stream = TGIStream(request)
    event = json.dumps({"error": {"message": message, "http_status_code": 422}}).encode()
    out = stream.feed(event)
    assert stream.failed and stream.failure is not None and stream.failure.status == status
    assert json.loads(out.split(b"\n\n")[0][len(b"data: ") :])["error"]["message"] == message


def test_tgi_validation_errors_name_the_field() -> None:
    body = b'{"error":"Input validation error: `top_p` must be > 0.0 and < 1.0","error_type":"validation"}'
    error = TGIAdapter().translate_error(422, body)
    assert (error.status, error.param) == (400, "top_p")


def test_tgi_completions_stream_finish_reasons_become_openai_ones() -> None:
    request = parse_request("completions", b'{"model": "m", "prompt": "hi", "stream": true}')
    stream = TGIStream(request)
    middle = {
        "object": "text_completion",
        "id": "",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "text": " a", "logprobs": None, "finish_reason": ""}],
    }
    last = {
        "object": "text_completion",
        "id": "",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "text": "</s>", "logprobs": None, "finish_reason": "eos_token"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    first = json.loads(stream.feed(json.dumps(middle).encode())[6:])
    assert first["choices"][0]["finish_reason"] is None
    final = json.loads(stream.feed(json.dumps(last).encode())[6:])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in final  # the client did not ask
    assert (request.prompt_tokens, request.completion_tokens) == (3, 2)


def test_tgi_non_streamed_stop_sequence_is_stop() -> None:
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    reply = {
        "id": "",
        "object": "chat.completion",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop_sequence"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    out = json.loads(TGIAdapter().translate_reply(request, json.dumps(reply).encode()))
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # vLLM 0.33: a missing required field, with the path of the body field
        (
            {"error": {"message": "Field required", "type": "Bad Request", "param": "body.messages", "code": 400}},
            "messages",
        ),
        # vLLM 0.33: validation messages end with (parameter=..., value=...)
        (
            {
                "error": {
                    "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            "max_tokens",
        ),
        (
            {
                "error": {
                    "message": "This model's maximum context length is 10 tokens.",
                    "type": "BadRequestError",
                    "param": "input_tokens",
                    "code": 400,
                }
            },
            "messages",
        ),
        # SGLang 0.5.23 never fills it
        (
            {
                "object": "error",
                "message": "Messages cannot be empty.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            "messages",
        ),
    ],
)
def test_engine_errors_reach_clients_with_param_filled(body: dict, param: str) -> None:
    error = OpenAICompatibleAdapter.error_from(400, json.dumps(body).encode())
    assert (error.status, error.param) == (400, param)


def test_sglang_in_stream_queue_full_is_a_retryable_503() -> None:
    from sloproxy.adapters.openai_compat import PassThroughStream

    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}')
    stream = PassThroughStream(request)
    stream.feed(
        b'{"error": {"message": "The request queue is full.", "type": "SERVICE_UNAVAILABLE", '
        b'"param": null, "code": 503}}'
    )
    assert stream.failure is not None and stream.failure.status == 503


def test_vllm_priority_goes_in_a_header_and_the_body_passes_untouched() -> None:
    adapter = VLLMAdapter(priority_scheduling=True)
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": 5}'
    request = parse_request("chat", raw)
    request.band = 1
    call = adapter.build(request)
    assert call.headers["X-Vllm-Priority"] == str(request.urgency_rank)
    assert call.body == raw  # no re-encoding of the prompt
    fcfs = VLLMAdapter().build(parse_request("chat", raw))
    assert "X-Vllm-Priority" not in fcfs.headers and "priority" not in json.loads(fcfs.body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "rid": "theirs", "priority": 9},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"continuous_usage_stats": True},
        },
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99},
    ],
)
@pytest.mark.parametrize("priority_scheduling", [True, False])
def test_sglang_body_written_at_its_end_means_what_a_rebuilt_one_does(body: dict, priority_scheduling: bool) -> None:
    """The proxy's fields are written after the client's (the last of a name wins in SGLang's JSON
    parser), so the prompt is never re-encoded; what the engine reads is what a rebuilt body says."""
    adapter = SGLangAdapter(priority_scheduling=priority_scheduling)
    request = parse_request("chat", json.dumps(body).encode())
    request.band = 1
    sent = json.loads(adapter.build(request).body)  # json.loads: the last of a name wins, as in SGLang
    assert sent["rid"] == f"{request.id}-0" and sent["messages"] == body["messages"]
    assert sent.get("priority") == (-request.urgency_rank if priority_scheduling else None)
    if body.get("stream"):
        assert sent["stream_options"]["include_usage"] is True
        assert sent["stream_options"].get("continuous_usage_stats") == body.get("stream_options", {}).get(
            "continuous_usage_stats"
        )
    assert sent.get("max_tokens") == body.get("max_tokens")


def test_vllm_orca_report_freshens_waiting_and_kv_between_polls() -> None:
    """vLLM 0.33 sends `endpoint-load-metrics` with non-streamed successes when asked: the proxy asks for
    it on non-streamed calls only (streams never get one) and takes the two figures it carries."""
    from sloproxy.adapters.base import BackendLoad
    from sloproxy.backends import BackendPool
    from sloproxy.config import BackendConfig, HealthConfig, LoadPolling

    adapter = VLLMAdapter()
    plain = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    streamed = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}')
    assert adapter.build(plain).headers["endpoint-load-metrics-format"] == "TEXT"
    assert "endpoint-load-metrics-format" not in adapter.build(streamed).headers
    pool = BackendPool([BackendConfig("v", "vllm", "http://127.0.0.1:9", ["m"])], HealthConfig(), LoadPolling())
    backend = pool.backends[0]
    header = b"TEXT named_metrics.num_requests_waiting=3.0, named_metrics.kv_cache_usage_perc=0.625"
    pool.reply_load(backend, [(b"Endpoint-Load-Metrics", header)])
    assert backend.load is None  # nothing to merge into before the first full reading
    backend.load, backend.load_read_at = BackendLoad(running=7, waiting=0, kv_usage=0.1, kv_capacity_tokens=1000), 0.0
    pool.reply_load(backend, [(b"content-type", b"application/json"), (b"Endpoint-Load-Metrics", header)])
    assert backend.load == BackendLoad(running=7, waiting=3, kv_usage=0.625, kv_capacity_tokens=1000)
    assert backend.load_read_at > 0.0
    before = backend.load
    pool.reply_load(backend, [(b"endpoint-load-metrics", b"TEXT ")])  # stats logging off: an empty report
    assert backend.load is before


def test_load_unknown_routes_as_stale_and_its_budget_climbs_as_slow_start() -> None:
    """An engine whose /metrics lacks its load figures: no reading (never zero load), stale for routing,
    and the dispatch budget doubles while it is what limits dispatch (capacity shows only by failing)."""
    from sloproxy.backends import BackendPool
    from sloproxy.config import BackendConfig, HealthConfig, LoadPolling
    from sloproxy.plugins import load_policy
    from sloproxy.scheduler import Scheduler
    from sloproxy.scheduler_config import SchedulingConfig

    pool = BackendPool([BackendConfig("v", "vllm", "http://127.0.0.1:9", ["m"])], HealthConfig(), LoadPolling())
    scheduler = Scheduler(load_policy("slo"), pool, SchedulingConfig(budget_initial=8))
    backend = pool.backends[0]
    load = backend.adapter.parse_load(NO_ENGINE_METRICS)
    assert load is None
    backend.load, backend.load_read_at, backend.load_reported = None, None, False
    backend.in_flight = backend.mine = 4  # half the budget: not the limit
    scheduler._on_load_update(backend)
    assert backend.budget == 8 and backend.load_is_stale
    backend.in_flight = backend.mine = 8
    scheduler._on_load_update(backend)
    assert backend.budget == 16
