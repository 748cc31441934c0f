"""SGLang 0.5.23's contract (the Python HTTP frontend), as the emulator serves it: one behaviour per test.

Each test names the SGLang source it was read from (paths inside the 0.5.23 wheel; facts only). The
next SGLang release is a diff of this list. The last tests pin what ``engine_version`` below 0.5.3
keeps.
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

MODEL = "qwen-7b"
WINDOW = 4096
MAX_REQ_LEN = WINDOW - 1  # min(context_len - 1, KV pool - 1); the pool is far larger here
MAX_REQ_INPUT_LEN = MAX_REQ_LEN - 5
BASE = {"engine": "sglang", "model": MODEL, "profile": "h100-llama3-8b"}
FLEET = [
    {"name": "s", **BASE, "max_model_len": WINDOW},
    {"name": "default", **BASE},  # no --context-length: the model's own (8192 for this profile)
    {"name": "queue", **BASE, "max_model_len": WINDOW, "max_num_seqs": 1, "max_queued_requests": 1},
    {
        "name": "prio",
        **BASE,
        "max_model_len": WINDOW,
        "scheduling_policy": "priority",
        "max_num_seqs": 1,
        "max_queued_requests": 1,
        "request_header_overrides": True,
    },
    {"name": "prio-metrics", **BASE, "max_model_len": WINDOW, "scheduling_policy": "priority", "max_num_seqs": 1},
    {"name": "old", **BASE, "max_model_len": WINDOW, "engine_version": "0.5.2"},
]
QUEUE_FULL = "The request queue is full."


@pytest.fixture(scope="module")
def sglang() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(FLEET, speedup=20.0) as running:
        yield running


def chat(tokens: int | None = None, **extra) -> dict:
    """A chat request whose rendered prompt is exactly ``tokens`` tokens (a short one by default)."""
    return exact_chat(MODEL, tokens, **extra)


async def chat_post(url: str, body: dict, headers: dict | None = None):
    return await post_json(url + "/v1/chat/completions", body, headers)


def flat(message: str, type_: str = "BadRequestError", code: int = 400) -> dict:
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


def frames(raw: bytes) -> list:
    return [json.loads(e) if e != b"[DONE]" else "[DONE]" for e in sse_events(raw)]


@contextlib.asynccontextmanager
async def held(url: str, bodies: list[dict]) -> AsyncIterator[None]:
    """Non-streamed requests left in flight (running or queued), sent in order, until the block ends."""
    jobs = []
    for body in bodies:
        jobs.append(asyncio.ensure_future(chat_post(url, body)))
        for _ in range(200):
            state = json.loads((await get(url + "/_emulator/state"))[1])
            if state["running"] + state["waiting"] == len(jobs):
                break
            await asyncio.sleep(0.005)
    try:
        yield
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)


LONG = {"max_tokens": 3000, "ignore_eos": True}


# ----- context length --------------------------------------------------------------------------------


async def test_prompt_at_or_over_context_length_is_400(sglang):
    # sglang/srt/managers/tokenizer_manager.py:1338-1350 (">=": equal is refused too);
    # serving_chat.py:2818-2819 -> serving_base.py:205-221 (flat ErrorResponse, BadRequestError, param null)
    for stream in (False, True):  # the generator is kick-started before HTTP 200 (serving_chat.py:2421-2428)
        status, body, _ = await chat_post(sglang.url("s"), chat(WINDOW, stream=stream))
        assert status == 400
        assert body == flat(f"The input ({WINDOW} tokens) is longer than the model's context length ({WINDOW} tokens).")


async def test_prompt_plus_max_tokens_over_context_length_is_400(sglang):
    # sglang/srt/managers/tokenizer_manager.py:1353-1377 (only when max_tokens is sent)
    status, body, _ = await chat_post(sglang.url("s"), chat(4000, max_tokens=97))
    assert status == 400
    assert body == flat(
        f"Requested token count exceeds the model's maximum context length of {WINDOW} tokens. You requested a "
        "total of 4097 tokens: 4000 tokens from the input messages and 97 tokens for the completion. Please "
        "reduce the number of tokens in the input messages or the completion to fit within the limit."
    )


async def test_scheduler_input_limit_is_stricter_than_the_context(sglang):
    # sglang/srt/managers/tp_worker.py:568-572 (max_req_input_len = min(ctx - 1, kv - 1) - 5);
    # managers/utils.py:272-287 (">=" and the message); tokenizer_manager.py:1916-1918 (non-stream: 400)
    message = (
        f"Input length ({MAX_REQ_INPUT_LEN} tokens) exceeds the maximum allowed length ({MAX_REQ_INPUT_LEN} "
        "tokens). Use a shorter input or enable --allow-auto-truncate."
    )
    status, body, _ = await chat_post(sglang.url("s"), chat(MAX_REQ_INPUT_LEN))
    assert status == 400 and body == flat(message)
    status, _, _ = await chat_post(sglang.url("s"), chat(MAX_REQ_INPUT_LEN - 1, max_tokens=1))
    assert status == 200


async def test_scheduler_input_limit_arrives_inside_a_stream(sglang):
    # The scheduler's abort is the first output, not an exception: HTTP 200, then the nested error frame
    # with the status name as type (serving_chat.py:2568-2579; serving_base.py:223-237), then [DONE] (:2805)
    status, raw = await stream_raw(sglang.url("s") + "/v1/chat/completions", chat(MAX_REQ_INPUT_LEN, stream=True))
    assert status == 200
    events = frames(raw)
    assert events[-1] == "[DONE]" and len(events) == 2
    assert events[0]["error"]["type"] == "BAD_REQUEST" and events[0]["error"]["code"] == 400
    assert raw.startswith(b'data: {"error": {"object": "error", "message": "Input length (')  # json.dumps spacing


async def test_chat_without_max_tokens_is_clamped_by_the_scheduler(sglang):
    # sglang/srt/entrypoints/openai/protocol.py:928-936 (None); scheduler.py:2693-2716
    # (min(max_new_tokens or 1 << 30, max_req_len - input - 1)), which also trims an explicit max_tokens
    status, body, _ = await chat_post(sglang.url("s"), chat(4000, ignore_eos=True))
    assert status == 200 and body["usage"]["completion_tokens"] == MAX_REQ_LEN - 4000 - 1
    status, body, _ = await chat_post(sglang.url("s"), chat(4000, max_tokens=96, ignore_eos=True))
    assert status == 200 and body["usage"]["completion_tokens"] == MAX_REQ_LEN - 4000 - 1


async def test_completions_default_max_tokens_is_16(sglang):
    # sglang/srt/entrypoints/openai/protocol.py:378
    body = {"model": MODEL, "prompt": "Once upon a time", "ignore_eos": True}
    status, reply, _ = await post_json(sglang.url("s") + "/v1/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] == 16


async def test_chat_max_tokens_over_a_set_context_length_is_400(sglang):
    # sglang/srt/entrypoints/openai/serving_chat.py:1180-1190 (only with --context-length; no space after ".")
    status, body, _ = await chat_post(sglang.url("s"), chat(max_tokens=WINDOW + 1))
    assert status == 400
    assert body == flat(
        f"max_completion_tokens is too large: {WINDOW + 1}.This model supports at most {WINDOW} completion tokens."
    )


# ----- /v1/models, /server_info, /model_info, /v1/loads ---------------------------------------------


async def test_models_card_carries_the_effective_context_length(sglang):
    # sglang/srt/entrypoints/http_server.py:1993-2022; openai/protocol.py:87-96 (ModelCard fields)
    for name, window in (("s", WINDOW), ("default", 8192)):
        _, raw, _ = await get(sglang.url(name) + "/v1/models")
        card = json.loads(raw)["data"][0]
        assert card == {**card, "id": MODEL, "owned_by": "sglang", "parent": None, "max_model_len": window}


async def test_model_card_route_matches_only_the_served_name(sglang):
    # sglang/srt/entrypoints/http_server.py:2025-2047 (nested 404 with a string code)
    status, raw, _ = await get(sglang.url("s") + f"/v1/models/{MODEL}")
    assert status == 200 and json.loads(raw)["max_model_len"] == WINDOW
    status, raw, _ = await get(sglang.url("s") + "/v1/models/other")
    assert status == 404
    assert json.loads(raw) == {
        "error": {
            "message": "The model 'other' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


async def test_server_info_context_length_is_the_flag_as_given(sglang):
    # sglang/srt/utils/common.py:3584-3594 (resolved args, flat; --context-length null unless set);
    # scheduler.py:1943-1948 (max_total_num_tokens, max_req_input_len); http_server.py:864-894
    _, raw, _ = await get(sglang.url("s") + "/server_info")
    info = json.loads(raw)
    assert info["context_length"] == WINDOW and info["max_req_input_len"] == MAX_REQ_INPUT_LEN
    assert info["max_total_num_tokens"] > WINDOW and info["version"] == "0.5.23" and info["frontend"] == "python"
    assert isinstance(info["internal_states"], list)
    _, raw, _ = await get(sglang.url("default") + "/server_info")
    assert json.loads(raw)["context_length"] is None
    status, _, _ = await get(sglang.url("default") + "/get_server_info")  # deprecated alias, still served
    assert status == 200


async def test_model_info_has_no_context_length(sglang):
    # sglang/srt/entrypoints/http_server.py:812-844 (and the deprecated /get_model_info, :802)
    for route in ("/model_info", "/get_model_info"):
        status, raw, _ = await get(sglang.url("s") + route)
        info = json.loads(raw)
        assert status == 200 and info["model_path"] == MODEL and info["served_model_name"] == MODEL
        assert "context_length" not in info and "max_total_num_tokens" not in info


async def test_v1_loads_replaces_get_load(sglang):
    # sglang/srt/entrypoints/v1_loads.py:96-150; managers/load_snapshot.py:196-258; no "/get_load" route
    url = sglang.url("s")
    assert (await get(url + "/get_load"))[0] == 404
    status, raw, _ = await get(url + "/v1/loads")
    reply = json.loads(raw)
    assert status == 200 and reply["version"] == "0.5.23" and len(reply["loads"]) == 1
    load = reply["loads"][0]
    for key in (
        "dp_rank",
        "num_running_reqs",
        "num_waiting_reqs",
        "num_used_tokens",
        "num_total_tokens",
        "max_total_num_tokens",
        "token_usage",
        "cache_hit_rate",
    ):
        assert key in load
    assert "num_tokens" not in load
    # An out-of-range dp_rank answers no loads (managers/tokenizer_control_mixin.py:1027-1030).
    assert json.loads((await get(url + "/v1/loads?dp_rank=3"))[1])["loads"] == []


# ----- metrics ---------------------------------------------------------------------------------------


async def test_metric_names(sglang):
    # sglang/srt/observability/metrics_collector.py:365, 371, 389, 405, 433, 1290, 1338; scheduler labels
    # :1382-1393 (model_name, engine_type, tp/pp/moe_ep ranks)
    await chat_post(sglang.url("s"), chat(max_tokens=2))
    _, raw, _ = await get(sglang.url("s") + "/metrics")
    samples = metric_samples(raw.decode())
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:num_used_tokens",
        "sglang:max_total_num_tokens",
        "sglang:cache_hit_rate",
        "sglang:context_len",
    ):
        labels = samples[name][0][0]
        assert labels["model_name"] == MODEL and labels["tp_rank"] == "0" and "priority" not in labels
    assert samples["sglang:context_len"][0][1] == WINDOW


async def test_priority_scheduling_exports_totals_and_per_priority_series(sglang):
    # sglang/srt/observability/metrics_collector.py:1417-1429 (total under priority="", then each priority;
    # a priority once seen keeps its series), :1388-1389 (the priority label only with priority scheduling)
    url = sglang.url("prio-metrics")
    async with held(url, [chat(priority=3, **LONG), chat(priority=5, **LONG)]):
        _, raw, _ = await get(url + "/metrics")
        running = {s[0]["priority"]: s[1] for s in metric_samples(raw.decode())["sglang:num_running_reqs"]}
        queued = {s[0]["priority"]: s[1] for s in metric_samples(raw.decode())["sglang:num_queue_reqs"]}
    assert running == {"": 1.0, "3": 1.0, "5": 0.0}
    assert queued == {"": 1.0, "3": 0.0, "5": 1.0}


# ----- queue limit and priority -------------------------------------------------------------------------


async def test_full_queue_is_503_flat(sglang):
    # sglang/srt/managers/scheduler.py:3553-3593 (waiting queue + 1 > limit); tokenizer_manager.py:1916-1921
    # (HTTPException 503); serving_base.py:119-122 (type = the status as a string)
    url = sglang.url("queue")
    async with held(url, [chat(**LONG), chat(**LONG)]):  # one running, one waiting
        status, body, _ = await chat_post(url, chat(max_tokens=2))
        assert status == 503
        assert body == flat(QUEUE_FULL, "503", 503)


async def test_full_queue_arrives_inside_a_stream(sglang):
    # The abort is an output, so HTTP 200 is already committed: the error frame (type = the status name),
    # the usage chunk when asked (serving_chat.py:2767-2797), then [DONE] (:2805)
    url = sglang.url("queue")
    async with held(url, [chat(**LONG), chat(**LONG)]):
        body = chat(max_tokens=2, stream=True, stream_options={"include_usage": True})
        status, raw = await stream_raw(url + "/v1/chat/completions", body)
    assert status == 200
    events = frames(raw)
    assert events[0] == {"error": flat(QUEUE_FULL, "SERVICE_UNAVAILABLE", 503)}
    assert events[1]["choices"] == [] and "usage" in events[1]
    assert events[2] == "[DONE]" and len(events) == 3


async def test_higher_priority_request_evicts_the_least_preferred_queued_one(sglang):
    # sglang/srt/managers/scheduler.py:3562-3580 (priority scheduling: the lowest-priority queued request is
    # aborted instead, if strictly worse); larger value = higher priority (arg_groups/fields/schedule.py:103-106)
    url = sglang.url("prio")
    async with held(url, [chat(priority=1, **LONG)]):
        queued = asyncio.ensure_future(chat_post(url, chat(priority=0, max_tokens=2)))
        await asyncio.sleep(0.05)
        better = asyncio.ensure_future(chat_post(url, chat(priority=9, max_tokens=2)))
        status, body, _ = await asyncio.wait_for(queued, 10)
        assert status == 503
        assert body == flat("The request is aborted by a higher priority request.", "503", 503)
        worse_status, _, _ = await chat_post(url, chat(priority=-5, max_tokens=2))
        assert worse_status == 503  # not better than any queued request: refused itself
        better.cancel()


async def test_priority_is_ignored_without_priority_scheduling(sglang):
    # sglang/srt/managers/scheduler.py:3520-3543 (_set_or_validate_priority: ignored unless
    # --abort-on-priority-when-disabled)
    status, _, _ = await chat_post(sglang.url("s"), chat(max_tokens=2, priority=100))
    assert status == 200


async def test_priority_header_needs_the_opt_in_and_only_applies_to_chat(sglang):
    # sglang/srt/entrypoints/request_headers.py:18, 28-33 (int(); a bad value is a 400); serving_chat.py:1416-1421
    # (only with SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES=1, environ.py:335); no call in serving_completions.py
    bad = {"x-override-priority": "high"}
    status, body, _ = await chat_post(sglang.url("prio"), chat(max_tokens=2), bad)
    assert status == 400
    assert body == flat(
        "invalid x-override-priority header 'high': invalid literal for int() with base 10: 'high'", "400"
    )
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    status, _, _ = await post_json(sglang.url("prio") + "/v1/completions", completion, bad)
    assert status == 200
    status, _, _ = await chat_post(sglang.url("s"), chat(max_tokens=2), bad)  # no opt-in: ignored
    assert status == 200


# ----- request shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}])
async def test_no_usage_chunk_unless_include_usage(sglang, options):
    # sglang/srt/entrypoints/openai/protocol.py:232-234 ({} parses to include_usage=False);
    # openai/utils.py:250-264
    body = chat(max_tokens=2, stream=True)
    if options is not None:
        body["stream_options"] = options
    _, raw = await stream_raw(sglang.url("s") + "/v1/chat/completions", body)
    assert not [e for e in frames(raw) if isinstance(e, dict) and e.get("choices") == []]


async def test_stream_chunk_shapes(sglang):
    # sglang/srt/entrypoints/openai/sse_utils.py:13-40 (reasoning_content always present; role and content
    # omitted when None); serving_chat.py:2641-2661 (the finish reason in a chunk of its own)
    _, raw = await stream_raw(sglang.url("s") + "/v1/chat/completions", chat(max_tokens=2, stream=True))
    events = frames(raw)
    assert events[0]["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"]["reasoning_content"] is None
    assert events[-2]["choices"][0]["delta"] == {"reasoning_content": None}
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[0]["id"].startswith("chatcmpl-")  # serving_chat.py:638-639, serving_base.py:155-158


async def test_any_model_name_is_accepted_and_echoed(sglang):
    # No served-name check on chat/completions; "model" defaults to "default" (openai/protocol.py:84, :920-923)
    status, body, _ = await chat_post(sglang.url("s"), {**chat(max_tokens=2), "model": "gpt-5"})
    assert status == 200 and body["model"] == "gpt-5"
    status, body, _ = await chat_post(sglang.url("s"), {"messages": chat()["messages"], "max_tokens": 2})
    assert status == 200 and body["model"] == "default"


async def test_base_colon_adapter_names_need_lora(sglang):
    # sglang/srt/entrypoints/openai/serving_base.py:40-60 (split at ":"); tokenizer_manager.py:3729-3740
    status, body, _ = await chat_post(sglang.url("s"), {**chat(max_tokens=2), "model": f"{MODEL}:sql"})
    assert status == 400
    assert body["message"].startswith("LoRA adapter 'sql' was requested, but LoRA is not enabled.")


async def test_schema_errors_are_400_flat_bad_request(sglang):
    # sglang/srt/entrypoints/http_server.py:635-691 (400, not 422; type "Bad Request"; param null)
    status, body, _ = await chat_post(sglang.url("s"), {"model": MODEL})
    assert status == 400
    assert (body["object"], body["type"], body["param"], body["code"]) == ("error", "Bad Request", None, 400)
    assert "('body', 'messages')" in body["message"] and "Field required" in body["message"]


async def test_empty_messages_and_prompts_are_400(sglang):
    # sglang/srt/entrypoints/openai/serving_chat.py:1105-1106; serving_completions.py:63-67
    status, body, _ = await chat_post(sglang.url("s"), {"model": MODEL, "messages": []})
    assert status == 400 and body == flat("Messages cannot be empty.")
    status, body, _ = await post_json(sglang.url("s") + "/v1/completions", {"model": MODEL, "prompt": ""})
    assert status == 400 and body == flat("Prompt cannot be empty")


async def test_no_frames_before_the_first_token_on_a_held_queue(sglang):
    # serving_chat.py:2421-2428: HTTP 200 goes out with the first chunk; a queued stream has sent nothing yet
    url = sglang.url("queue")
    async with held(url, [chat(**LONG)]), aiohttp.ClientSession() as session:
        request = session.post(url + "/v1/chat/completions", json=chat(max_tokens=2, stream=True))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(request.__aenter__(), 0.3)


# ----- engine_version below 0.5.3 -----------------------------------------------------------------------


async def test_old_version_serves_get_load(sglang):
    status, raw, _ = await get(sglang.url("old") + "/get_load")
    load = json.loads(raw)
    assert status == 200 and {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])
