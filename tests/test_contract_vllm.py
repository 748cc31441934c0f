"""vLLM 0.33.0's contract, as the emulator serves it: one behaviour a proxy can see per test.

Each test names the vLLM source it was read from (paths inside the 0.33.0 wheel; facts only). The
next vLLM release is a diff of this list. The tests at the end pin what ``engine_version`` below
0.12 keeps (the rules the emulator modelled as 0.11).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from sloproxy.processes import EmulatorProcess
from tests.helpers import exact_chat, get, metric_samples, post_json, sse_events, stream_raw

MODEL = "llama-3-8b"
WINDOW = 4096
BASE = {"engine": "vllm", "model": MODEL, "profile": "h100-llama3-8b", "max_model_len": WINDOW}
FLEET = [
    {"name": "v", **BASE},
    {"name": "queue", **BASE, "max_queued_requests": 2},
    {"name": "prio", **BASE, "scheduling_policy": "priority", "max_num_seqs": 1},
    {"name": "nostats", **BASE, "disable_log_stats": True},
    {"name": "sleepy", **BASE},
    {"name": "old", **BASE, "engine_version": "0.11"},
]
BUSY = "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance."


@pytest.fixture(scope="module")
def vllm() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(FLEET, speedup=20.0) as running:
        yield running


def chat(tokens: int | None = None, **extra) -> dict:
    """A chat request whose rendered prompt is exactly ``tokens`` tokens (a short one by default)."""
    return exact_chat(MODEL, tokens, **extra)


def ids(n: int) -> list[int]:
    return [7] * n


async def chat_post(url: str, body: dict, headers: dict | None = None):
    return await post_json(url + "/v1/chat/completions", body, headers)


async def completion_post(url: str, body: dict, headers: dict | None = None):
    return await post_json(url + "/v1/completions", {"model": MODEL, **body}, headers)


@contextlib.asynccontextmanager
async def held_streams(url: str, count: int) -> AsyncIterator[None]:
    """``count`` long streamed requests in flight (started) until the block ends; then the clients go."""
    async with aiohttp.ClientSession() as session:
        responses = []
        for _ in range(count):
            body = chat(max_tokens=3000, ignore_eos=True, stream=True)
            response = await session.post(url + "/v1/chat/completions", json=body)
            assert response.status == 200
            await response.content.readline()
            responses.append(response)
        try:
            yield
        finally:
            for response in responses:
                response.close()


# ----- context window -------------------------------------------------------------------------------


async def test_text_prompt_over_window_is_400_with_lower_bound_count(vllm):
    # vllm/renderers/params.py:372-392 (text tokenized with truncation at max_model_len + 1), :537-551 (the
    # message, "at least" when the count is max_model_len + 1); vllm/exceptions.py:49-56 (the suffix);
    # vllm/entrypoints/serve/exception_handling/error_response.py:43-46 (400 BadRequestError, param)
    status, body, _ = await completion_post(vllm.url("v"), {"prompt": " x" * 5000, "max_tokens": 10})
    assert status == 400
    assert body == {
        "error": {
            "message": f"This model's maximum context length is {WINDOW} tokens. However, your prompt contains at "
            f"least {WINDOW + 1} input tokens, which exceeds this limit even without any output tokens. Please "
            f"reduce the length of the input prompt. (parameter=input_tokens, value={WINDOW + 1})",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    }


async def test_token_id_prompt_over_window_reports_exact_count(vllm):
    # vllm/renderers/params.py:537-551: token-id prompts are not truncated, so the count is exact
    status, body, _ = await completion_post(vllm.url("v"), {"prompt": ids(WINDOW + 10), "max_tokens": 1})
    assert status == 400
    assert f"your prompt contains {WINDOW + 10} input tokens" in body["error"]["message"]
    assert body["error"]["message"].endswith(f"(parameter=input_tokens, value={WINDOW + 10})")


async def test_prompt_filling_the_window_is_refused_as_max_tokens_0(vllm):
    # vllm/renderers/params.py:537 (">": passes), vllm/entrypoints/serve/utils/api_utils.py:253-270
    # (max_model_len - prompt = 0), vllm/sampling_params.py:691-696 ("max_tokens must be at least 1")
    for body in ({"prompt": ids(WINDOW)}, {"prompt": ids(WINDOW), "max_tokens": 100}):
        status, reply, _ = await completion_post(vllm.url("v"), body)
        assert status == 400
        assert reply["error"] == {
            "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    status, reply, _ = await chat_post(vllm.url("v"), chat(WINDOW))
    assert status == 400 and reply["error"]["param"] == "max_tokens"


async def test_prompt_plus_max_tokens_over_window_is_clamped(vllm):
    # vllm/entrypoints/serve/utils/api_utils.py:234-270: min(max_model_len - prompt, max_tokens)
    status, body, _ = await completion_post(vllm.url("v"), {"prompt": ids(4000), "max_tokens": 500, "ignore_eos": True})
    assert status == 200
    assert body["usage"]["completion_tokens"] == WINDOW - 4000
    assert body["choices"][0]["finish_reason"] == "length"
    status, body, _ = await chat_post(vllm.url("v"), chat(4000, max_completion_tokens=500, ignore_eos=True))
    assert status == 200 and body["usage"]["completion_tokens"] == WINDOW - 4000


async def test_max_tokens_alone_over_window_is_400(vllm):
    # vllm/renderers/params.py:272-284; chat names the field it read (chat_completion/protocol.py:684-702),
    # completions always max_tokens (completion/protocol.py:299-310)
    status, body, _ = await chat_post(vllm.url("v"), chat(max_tokens=WINDOW + 1))
    assert status == 400
    assert body["error"] == {
        "message": f"max_tokens={WINDOW + 1} cannot be greater than max_model_len={WINDOW}. Please request fewer "
        f"output tokens. (parameter=max_tokens, value={WINDOW + 1})",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    status, body, _ = await chat_post(vllm.url("v"), chat(max_completion_tokens=WINDOW + 1))
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    assert body["error"]["message"].startswith(f"max_completion_tokens={WINDOW + 1} cannot be greater")


async def test_zero_or_negative_max_tokens_is_400(vllm):
    # vllm/sampling_params.py:691-696 via api_utils.py:261-270 (min keeps the request's value)
    status, body, _ = await chat_post(vllm.url("v"), chat(max_tokens=0))
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert body["error"]["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
    status, body, _ = await completion_post(vllm.url("v"), {"prompt": "Hi", "max_tokens": -3})
    assert status == 400 and "got -3." in body["error"]["message"]


async def test_chat_without_max_tokens_may_fill_the_window(vllm):
    # vllm/entrypoints/openai/chat_completion/protocol.py:244-249 (None), api_utils.py:253-270 (the remainder)
    status, body, _ = await chat_post(vllm.url("v"), chat(4000, ignore_eos=True))
    assert status == 200
    assert body["usage"]["completion_tokens"] == WINDOW - 4000


async def test_completions_default_max_tokens_is_16(vllm):
    # vllm/entrypoints/openai/completion/protocol.py:64 (16), :451-457 (explicit null -> 16)
    for extra in ({}, {"max_tokens": None}):
        status, body, _ = await completion_post(vllm.url("v"), {"prompt": "Once", "ignore_eos": True, **extra})
        assert status == 200 and body["usage"]["completion_tokens"] == 16


# ----- stream_options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "usage"),
    [(None, False), ({}, False), ({"include_usage": False}, False), ({"include_usage": True}, True)],
)
async def test_usage_chunk_only_with_include_usage_true(vllm, options, usage):
    # vllm/entrypoints/serve/utils/api_utils.py:273-285; generate/base/protocol.py:293-295 (default False);
    # chat_completion/serving.py:862-913 (one final chunk, choices [])
    body = chat(max_tokens=2, stream=True)
    if options is not None:
        body["stream_options"] = options
    _, raw = await stream_raw(vllm.url("v") + "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert any(c["choices"] == [] and "usage" in c for c in chunks) is usage


async def test_continuous_usage_stats_puts_usage_on_every_chunk(vllm):
    # vllm/entrypoints/serve/utils/api_utils.py:280-282; chat_completion/serving.py:623-634 (role chunk: 0),
    # :836-850 (running count)
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat(max_tokens=3, ignore_eos=True, stream=True, stream_options=options)
    _, raw = await stream_raw(vllm.url("v") + "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]


async def test_stream_options_need_stream_true_unless_empty(vllm):
    # vllm/entrypoints/openai/chat_completion/protocol.py:858-869 (truthiness: {} and null pass);
    # completion/protocol.py:599-610
    status, body, _ = await chat_post(vllm.url("v"), chat(max_tokens=2, stream_options={"include_usage": True}))
    assert status == 400
    assert body["error"] == {
        "message": "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
        "type": "BadRequestError",
        "param": "stream_options",
        "code": 400,
    }
    for options in ({}, None):
        status, _, _ = await chat_post(vllm.url("v"), chat(max_tokens=2, stream_options=options))
        assert status == 200
    status, _, _ = await completion_post(vllm.url("v"), {"prompt": "Hi", "stream_options": {"include_usage": True}})
    assert status == 400


# ----- priority ----------------------------------------------------------------------------------------


async def test_priority_is_ignored_under_fcfs(vllm):
    # vllm/v1/engine/input_processor.py:373-400 and async_llm.py:397-530 (no check);
    # vllm/v1/core/sched/request_queue.py:75-84 (FCFS appends); vllm/config/scheduler.py:159 (fcfs default)
    status, _, _ = await chat_post(vllm.url("v"), chat(max_tokens=2, priority=7))
    assert status == 200


async def test_priority_header_overrides_the_body(vllm):
    # vllm/entrypoints/generate/base/serving.py:42 (X-Vllm-Priority), :253-265 (an int overrides the body;
    # anything else is ignored); lower value first (vllm/v1/core/sched/request_queue.py:132-170)
    url = vllm.url("prio")  # one sequence at a time: the queue order is the finishing order
    finished: list[str] = []

    async def send(name: str, priority: int, header: str | None, tokens: int = 4) -> None:
        headers = {"X-Vllm-Priority": header} if header is not None else None
        status, _, _ = await chat_post(url, chat(max_tokens=tokens, ignore_eos=True, priority=priority), headers)
        assert status == 200
        finished.append(name)

    first = asyncio.ensure_future(send("running", 0, None, tokens=400))
    await asyncio.sleep(0.05)
    queued = [
        asyncio.ensure_future(send("header 9", 0, "9")),  # the body says 0, the header 9: runs last
        asyncio.ensure_future(send("body 5", 5, None)),
        asyncio.ensure_future(send("bad header", 1, "high")),  # not an int: the body's 1 counts
    ]
    await asyncio.gather(first, *queued)
    assert finished == ["running", "bad header", "body 5", "header 9"]


# ----- admission (max_num_queued_reqs) ------------------------------------------------------------


async def test_queue_limit_counts_running_and_waiting_and_answers_503(vllm):
    # vllm/v1/engine/async_llm.py:331-333, 352-369 (unfinished = running + waiting; current + n > max);
    # vllm/exceptions.py:162-174 (the message); error_response.py:39-42 (type = the HTTP phrase, param null)
    url = vllm.url("queue")
    async with held_streams(url, 2):  # both running, none waiting
        status, body, _ = await chat_post(url, chat(max_tokens=2))
        assert status == 503
        assert body == {"error": {"message": BUSY, "type": "Service Unavailable", "param": None, "code": 503}}
        # Checked in the preflight, before the stream starts: a real 503 for a stream too
        # (vllm/entrypoints/generate/base/serving.py:169-181).
        status, raw = await stream_raw(url + "/v1/chat/completions", chat(max_tokens=2, stream=True))
        assert status == 503 and json.loads(raw)["error"]["code"] == 503
    _, raw, _ = await get(url + "/metrics")
    rejections = {s[0]["reason"]: s[1] for s in metric_samples(raw.decode())["vllm:admission_rejections_total"]}
    # vllm/v1/metrics/loggers.py:845-859
    assert rejections == {"max_num_queued_reqs": 2.0, "max_num_queued_tokens": 0.0}


async def test_unknown_model_is_checked_before_the_queue(vllm):
    # vllm/entrypoints/openai/chat_completion/serving.py:278-283 (model check, then preflight)
    url = vllm.url("queue")
    async with held_streams(url, 2):
        status, body, _ = await chat_post(url, {**chat(max_tokens=2), "model": "nope"})
        assert status == 404 and body["error"]["type"] == "NotFoundError"


# ----- error bodies --------------------------------------------------------------------------------


async def test_unknown_model_is_404_listing_the_served_names(vllm):
    # vllm/entrypoints/serve/engine/serving.py:75-84
    status, body, _ = await chat_post(vllm.url("v"), {**chat(), "model": "gpt-5"})
    assert status == 404
    assert body == {
        "error": {
            "message": f"The model `gpt-5` does not exist. Valid aliases: {MODEL}.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


async def test_model_may_be_omitted(vllm):
    # vllm/entrypoints/serve/engine/serving.py:86-88 (a missing or empty model is the served one)
    status, body, _ = await chat_post(vllm.url("v"), {"messages": chat()["messages"], "max_tokens": 2})
    assert status == 200 and body["model"] == MODEL


async def test_schema_errors_are_400_bad_request_with_the_field_as_param(vllm):
    # vllm/entrypoints/serve/exception_handling/handlers/validation.py:149-195 (400, the phrase as type),
    # :135-146 and :167-171 (param from the error's loc)
    status, body, _ = await chat_post(vllm.url("v"), {"model": MODEL})
    assert status == 400
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.messages", 400)
    assert error["message"].startswith("1 validation error:")
    status, body, _ = await chat_post(vllm.url("v"), chat(max_tokens="ten"))
    assert status == 400 and body["error"]["param"] == "body.max_tokens"


# ----- /v1/models, /version --------------------------------------------------------------------------


async def test_models_card_carries_max_model_len(vllm):
    # vllm/entrypoints/openai/models/serving.py:64-77; serve/engine/protocol.py:105-113
    status, raw, _ = await get(vllm.url("v") + "/v1/models")
    card = json.loads(raw)["data"][0]
    assert status == 200
    assert (card["id"], card["owned_by"], card["max_model_len"], card["parent"]) == (MODEL, "vllm", WINDOW, None)


async def test_version_route(vllm):
    # vllm/entrypoints/serve/instrumentator/basic.py:53-56; vllm/_version.py:22
    status, raw, _ = await get(vllm.url("v") + "/version")
    assert status == 200 and json.loads(raw) == {"version": "0.33.0"}


# ----- sleep mode ------------------------------------------------------------------------------------


async def post(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.post(url) as response:
        raw = await response.read()
        return response.status, json.loads(raw) if raw else None


async def test_sleep_level_0_pauses_scheduling_and_wakes_with_the_scheduling_tag(vllm):
    # vllm/entrypoints/serve/dev/sleep/api_router.py:26-34 (level 0..2, JSON reply), :44-55 (wake reply);
    # vllm/v1/engine/core.py:996-1010 (level 0: requests accepted, not processed), :1031-1056 ("scheduling")
    url = vllm.url("sleepy")
    assert await post(url + "/sleep?level=0") == (200, {"status": "sleeping", "level": 0})
    assert json.loads((await get(url + "/is_sleeping"))[1]) == {"is_sleeping": True}
    pending = asyncio.ensure_future(chat_post(url, chat(max_tokens=2)))
    await asyncio.sleep(0.2)
    assert not pending.done()
    assert await post(url + "/wake_up?tags=scheduling") == (200, {"status": "awake", "tags": ["scheduling"]})
    status, _, _ = await asyncio.wait_for(pending, 10)
    assert status == 200


async def test_sleep_aborts_requests_in_flight_by_default(vllm):
    # vllm/entrypoints/serve/dev/sleep/api_router.py:29-30 (mode default "abort");
    # vllm/v1/engine/core.py:963-977 (abort: every request finishes aborted)
    url = vllm.url("sleepy")
    job = asyncio.ensure_future(chat_post(url, chat(max_tokens=3000, ignore_eos=True)))
    await asyncio.sleep(0.1)
    assert await post(url + "/sleep?level=1") == (200, {"status": "sleeping", "level": 1})
    status, body, _ = await asyncio.wait_for(job, 10)
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert await post(url + "/wake_up") == (200, {"status": "awake", "tags": None})


async def test_sleep_mode_wait_lets_requests_in_flight_finish_first(vllm):
    # vllm/v1/engine/core.py:963-970 ("wait": new requests queue, in-flight ones drain, then it sleeps)
    url = vllm.url("sleepy")
    job = asyncio.ensure_future(chat_post(url, chat(max_tokens=200, ignore_eos=True)))
    await asyncio.sleep(0.05)
    assert await post(url + "/sleep?level=0&mode=wait") == (200, {"status": "sleeping", "level": 0})
    status, body, _ = await asyncio.wait_for(job, 5)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"  # finished, not aborted
    assert body["usage"]["completion_tokens"] == 200
    assert (await post(url + "/wake_up"))[1] == {"status": "awake", "tags": None}


async def test_partial_wake_keeps_sleeping_until_all_memory_is_back(vllm):
    # vllm/v1/engine/core.py:1031-1056 (fully awake only when no executor memory is still released)
    url = vllm.url("sleepy")
    await post(url + "/sleep?level=1")
    assert await post(url + "/wake_up?tags=weights") == (200, {"status": "sleeping", "tags": ["weights"]})
    assert await post(url + "/wake_up?tags=kv_cache") == (200, {"status": "awake", "tags": ["kv_cache"]})


async def test_sleep_level_3_is_a_validation_error(vllm):
    # vllm/entrypoints/serve/dev/sleep/api_router.py:29 (Query(ge=0, le=2)) -> the 400 validation handler
    status, body = await post(vllm.url("sleepy") + "/sleep?level=3")
    assert status == 400 and body["error"]["type"] == "Bad Request"


# ----- metrics ---------------------------------------------------------------------------------------


async def test_kv_cache_usage_metric_and_labels(vllm):
    # vllm/v1/metrics/loggers.py:499-505 (model_name, engine), :527-545 (running, waiting), :619-627
    # (vllm:kv_cache_usage_perc; no vllm:gpu_cache_usage_perc)
    await chat_post(vllm.url("v"), chat(max_tokens=2))
    _, raw, _ = await get(vllm.url("v") + "/metrics")
    samples = metric_samples(raw.decode())
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert samples[name][0][0] == {"model_name": MODEL, "engine": "0"}
    assert 0.0 <= samples["vllm:kv_cache_usage_perc"][0][1] <= 1.0
    assert "vllm:gpu_cache_usage_perc" not in samples


async def test_cache_config_info_carries_kv_cache_size_tokens(vllm):
    # vllm/v1/metrics/loggers.py:1114-1136 (CacheConfig fields as labels, plus engine); vllm/config/cache.py:344-347
    _, raw, _ = await get(vllm.url("v") + "/metrics")
    (labels, value), *_ = metric_samples(raw.decode())["vllm:cache_config_info"]
    assert value == 1.0 and labels["engine"] == "0"
    assert int(labels["kv_cache_size_tokens"]) == int(labels["num_gpu_blocks"]) * int(labels["block_size"])


async def test_disable_log_stats_keeps_metrics_route_without_engine_families(vllm):
    # vllm/v1/engine/async_llm.py:204-214, 296 (no stat loggers); instrumentator/metrics.py:56-81 (still mounted)
    await chat_post(vllm.url("nostats"), chat(max_tokens=2))
    status, raw, _ = await get(vllm.url("nostats") + "/metrics")
    assert status == 200
    assert not [name for name in metric_samples(raw.decode()) if name.startswith("vllm:num_requests")]
    assert "vllm:kv_cache_usage_perc" not in raw.decode()


# ----- ORCA load report --------------------------------------------------------------------------------


async def test_orca_text_header_on_non_streamed_success(vllm):
    # vllm/entrypoints/openai/chat_completion/api_router.py:60-62, 74-78; serve/utils/orca_metrics.py:50-58
    # (TEXT, ", "-joined), :85-88 (only these two, from the gauges in registration order)
    _, _, headers = await chat_post(vllm.url("v"), chat(max_tokens=2), {"endpoint-load-metrics-format": "TEXT"})
    report = headers["endpoint-load-metrics"]
    assert report.startswith("TEXT named_metrics.num_requests_waiting=0.0, named_metrics.kv_cache_usage_perc=")
    float(report.rsplit("=", 1)[1])


async def test_orca_json_header_and_case_insensitive_format(vllm):
    # vllm/entrypoints/serve/utils/orca_metrics.py:33-47, 62-63 (format compared lower-cased)
    _, _, headers = await completion_post(vllm.url("v"), {"prompt": "Hi"}, {"endpoint-load-metrics-format": "json"})
    kind, payload = headers["endpoint-load-metrics"].split(" ", 1)
    assert kind == "JSON"
    assert set(json.loads(payload)["named_metrics"]) == {"kv_cache_usage_perc", "num_requests_waiting"}


async def test_orca_header_absent_on_streams_errors_and_unknown_formats(vllm):
    # vllm/entrypoints/openai/chat_completion/api_router.py:69-72, 80-85; orca_metrics.py:33-38
    url = vllm.url("v") + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        wanted = {"endpoint-load-metrics-format": "TEXT"}
        async with session.post(url, json=chat(max_tokens=2, stream=True), headers=wanted) as response:
            await response.read()
            assert "endpoint-load-metrics" not in response.headers
    _, _, headers = await chat_post(vllm.url("v"), {**chat(), "model": "nope"}, wanted)
    assert "endpoint-load-metrics" not in headers
    _, _, headers = await chat_post(vllm.url("v"), chat(max_tokens=2), {"endpoint-load-metrics-format": "PROTO"})
    assert "endpoint-load-metrics" not in headers
    _, _, headers = await chat_post(vllm.url("v"), chat(max_tokens=2))
    assert "endpoint-load-metrics" not in headers


async def test_orca_report_is_empty_without_stats(vllm):
    # vllm/entrypoints/serve/utils/orca_metrics.py:85-95 (read from the Prometheus registry, empty without it)
    url = vllm.url("nostats")
    _, _, headers = await chat_post(url, chat(max_tokens=2), {"endpoint-load-metrics-format": "TEXT"})
    assert headers["endpoint-load-metrics"] == "TEXT"  # "TEXT " on the wire; HTTP parsers trim the space
    _, _, headers = await chat_post(url, chat(max_tokens=2), {"endpoint-load-metrics-format": "JSON"})
    assert headers["endpoint-load-metrics"] == 'JSON {"named_metrics": {}}'


# ----- engine_version below 0.12: the rules the emulator modelled as 0.11 ---------------------------------


async def test_old_version_refuses_prompt_plus_max_tokens_over_window(vllm):
    status, body, _ = await completion_post(vllm.url("old"), {"prompt": ids(4000), "max_tokens": 500})
    assert status == 400
    assert body["error"]["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 500.")


async def test_old_version_empty_stream_options_turn_usage_on(vllm):
    body = chat(max_tokens=2, stream=True, stream_options={})
    _, raw = await stream_raw(vllm.url("old") + "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


async def test_old_version_refuses_priority_without_priority_scheduling(vllm):
    status, body, _ = await chat_post(vllm.url("old"), chat(max_tokens=2, priority=3))
    assert status == 400
    assert body["error"]["message"] == "Got priority 3 but Priority scheduling is not enabled."


async def test_old_version_reports_its_version_and_has_no_sleep_level_0(vllm):
    assert json.loads((await get(vllm.url("old") + "/version"))[1]) == {"version": "0.11"}
    status, _ = await post(vllm.url("old") + "/sleep?level=0")
    assert status == 400
