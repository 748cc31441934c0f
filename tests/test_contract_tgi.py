"""TGI 3.3.x's contract (the v3 router), as the emulator serves it: one behaviour a proxy can see per test.

Each test names the TGI source it was read from (huggingface/text-generation-inference at v3.3.7,
whose router equals HEAD; axum 0.7.9 for SSE framing; facts only). The next TGI release is a diff
of this list. The last tests pin what an older ``engine_version`` or ``sse_space: false`` keeps.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from sloproxy.processes import EmulatorProcess
from tests.helpers import get, post_json, sse_events, stream_raw

MODEL = "llama-3-8b"
TOTAL = 1500  # max_total_tokens
BASE = {"engine": "tgi", "model": MODEL, "profile": "a10-llama2-7b", "max_model_len": TOTAL}
FLEET = [
    {"name": "t", **BASE},
    {"name": "busy", **BASE, "max_concurrent_requests": 2},
    {"name": "wide", **BASE, "max_model_len": 4096},
    {"name": "nospace", **BASE, "sse_space": False},
    {"name": "old", **BASE, "engine_version": "2.0.4"},
]


@pytest.fixture(scope="module")
def tgi() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(FLEET, speedup=50.0) as running:
        yield running


def prompt(tokens: int) -> str:
    return " x" * tokens  # exactly ``tokens`` tokens


async def completion(url: str, **body) -> tuple[int, object, dict]:
    return await post_json(url + "/v1/completions", {"model": MODEL, **body})


def chat(**extra) -> dict:
    return {"model": "tgi", "messages": [{"role": "user", "content": "Say something."}], **extra}


def events(raw: bytes, prefix: bytes = b"data: ") -> list:
    return [json.loads(e) if e != b"[DONE]" else "[DONE]" for e in sse_events(raw, prefix)]


def validation(message: str) -> dict:
    return {"error": f"Input validation error: {message}", "error_type": "validation"}


@contextlib.asynccontextmanager
async def in_flight(url: str, count: int) -> AsyncIterator[None]:
    """``count`` long streamed requests holding concurrency permits until the block ends."""
    async with aiohttp.ClientSession() as session:
        responses = []
        for _ in range(count):
            body = {"model": MODEL, "prompt": "Go.", "ignore_eos": True, "stream": True}
            response = await session.post(url + "/v1/completions", json=body)
            await response.content.readline()
            responses.append(response)
        try:
            yield
        finally:
            for response in responses:
                response.close()


# ----- SSE framing -----------------------------------------------------------------------------------


async def test_sse_frames_have_a_space_after_data(tgi):
    # axum 0.7.9 sse.rs:231 (json_data writes b"data: "), :368-370 (field, ':', ' '); TGI on axum 0.7 since 2.1.0;
    # [DONE] at router/src/server.rs:981 (completions) and :1244 (chat); X-Accel-Buffering at server.rs:530
    async with aiohttp.ClientSession() as session:
        url = tgi.url("t") + "/v1/chat/completions"
        async with session.post(url, json=chat(max_tokens=3, stream=True)) as response:
            raw = await response.read()
            assert response.headers["X-Accel-Buffering"] == "no"
    parsed = events(raw)
    assert parsed[-1] == "[DONE]"


# ----- length validation (router/src/validation.rs) ------------------------------------------------------


async def test_input_plus_max_new_tokens_over_total_is_422(tgi):
    # router/src/validation.rs:170-179 (input + min(max_new_tokens, 1024) > max_total_tokens), :999 (message);
    # router/src/infer/mod.rs:414-415 ("Input validation error: "), server.rs:2409, 2418-2423 (422)
    status, body, _ = await completion(tgi.url("t"), prompt=prompt(1000), max_tokens=600)
    assert status == 422
    assert body == validation(
        f"`inputs` tokens + `max_new_tokens` must be <= {TOTAL}. Given: 1000 `inputs` tokens and 600 `max_new_tokens`"
    )


async def test_the_check_uses_at_most_1024_new_tokens(tgi):
    # router/src/validation.rs:25 (DEFAULT_GENERATION_LENGTH = 1024), :158-159 (min(max_new_tokens, 1024))
    status, body, _ = await completion(tgi.url("t"), prompt=prompt(1000), max_tokens=5000)
    assert status == 422
    assert body["error"].endswith("Given: 1000 `inputs` tokens and 1024 `max_new_tokens`")
    status, _, _ = await completion(tgi.url("t"), prompt=prompt(100), max_tokens=100_000, stream=False)
    assert status == 200  # 100 + 1024 fits: accepted although 100 + 100000 does not


async def test_generation_continues_in_1024_token_rounds_within_the_window(tgi):
    # router/src/infer/mod.rs:164-192: after a round ends on length the router re-validates the longer
    # input and schedules another min(max_new_tokens, 1024); when that fails the reply ends with "length"
    status, body, _ = await completion(tgi.url("t"), prompt=prompt(100), max_tokens=100_000, ignore_eos=True)
    assert status == 200
    assert body["usage"]["completion_tokens"] == 1024  # 100 + 1024 + 1024 > 1500: no second round
    assert body["choices"][0]["finish_reason"] == "length"


async def test_rounds_ask_for_the_full_max_new_tokens_again(tgi):
    # router/src/infer/mod.rs:123, 133, 164, 168 (parameters.max_new_tokens is never reduced between rounds;
    # the fact sheet's inference): a request for 1100 gets a second round of min(1100, 1024) when it fits
    status, body, _ = await completion(tgi.url("wide"), prompt=prompt(10), max_tokens=1100, ignore_eos=True)
    assert status == 200
    assert body["usage"]["completion_tokens"] == 2048


async def test_input_over_max_input_tokens_is_422(tgi):
    # router/src/validation.rs:181-187 (">": equal allowed), :1001; with max_new_tokens absent the default is
    # max_total - input (:164-168), so a prompt of max_total passes the total check and fails this one
    status, body, _ = await completion(tgi.url("t"), prompt=prompt(TOTAL))
    assert status == 422
    assert body == validation(f"`inputs` must have less than {TOTAL - 1} tokens. Given: {TOTAL}")


async def test_absent_max_tokens_is_the_rest_of_the_window(tgi):
    # router/src/validation.rs:161-168 ("Use the maximum possible number of tokens as default")
    status, body, _ = await completion(tgi.url("t"), prompt=prompt(100), ignore_eos=True)
    assert status == 200
    assert body["usage"]["completion_tokens"] == TOTAL - 100


async def test_zero_max_tokens_is_422(tgi):
    # router/src/validation.rs:285-287, :995
    status, body, _ = await completion(tgi.url("t"), prompt="Hi", max_tokens=0)
    assert status == 422 and body == validation("`max_new_tokens` must be strictly positive")


async def test_top_p_of_one_is_422(tgi):
    # router/src/validation.rs:258-265, :985
    status, body, _ = await post_json(tgi.url("t") + "/v1/chat/completions", chat(max_tokens=2, top_p=1.0))
    assert status == 422 and body == validation("`top_p` must be > 0.0 and < 1.0")


# ----- errors inside OpenAI streams ---------------------------------------------------------------------


async def test_validation_errors_arrive_inside_the_stream(tgi):
    # router/src/server.rs:532-555 (validation runs inside the lazy stream; the SSE response is 200);
    # router/src/infer/mod.rs:445-466 (into_openai_event: http_status_code hard-coded 422, no error_type);
    # server.rs:1241-1244 ([DONE] follows)
    status, raw = await stream_raw(
        tgi.url("t") + "/v1/completions", {"model": MODEL, "prompt": prompt(1000), "max_tokens": 600, "stream": True}
    )
    assert status == 200
    message = (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1500. "
        "Given: 1000 `inputs` tokens and 600 `max_new_tokens`"
    )
    assert events(raw) == [{"error": {"message": message, "http_status_code": 422}}, "[DONE]"]


async def test_overload_is_429_or_an_in_stream_error(tgi):
    # router/src/infer/mod.rs:83-84, 112-120 (a semaphore of max_concurrent_requests, no queueing), :412, 434
    # ("Model is overloaded", overloaded); server.rs:2408 (429); in a stream: mod.rs:445-454 (422 inside)
    url = tgi.url("busy")
    async with in_flight(url, 2):
        status, body, _ = await post_json(url + "/v1/chat/completions", chat(max_tokens=2))
        assert status == 429 and body == {"error": "Model is overloaded", "error_type": "overloaded"}
        status, raw = await stream_raw(url + "/v1/chat/completions", chat(max_tokens=2, stream=True))
        assert status == 200
        assert events(raw) == [{"error": {"message": "Model is overloaded", "http_status_code": 422}}, "[DONE]"]
        # The permit is taken before validation (mod.rs:111-128): an invalid request is "overloaded" too.
        status, body, _ = await completion(url, prompt="Hi", max_tokens=0)
        assert status == 429


async def test_suffix_is_refused_before_the_stream(tgi):
    # router/src/server.rs:748-757
    status, body, _ = await completion(tgi.url("t"), prompt="Hi", suffix="end", stream=True)
    assert status == 422
    assert body == {
        "error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
        "error_type": "suffix not supported",
    }


async def test_body_errors_are_axum_plain_text(tgi):
    # axum extract/rejection.rs:10-40 (422 "Failed to deserialize the JSON body into the target type",
    # 400 "Failed to parse the request body as JSON"), not JSON bodies
    async with aiohttp.ClientSession() as session:
        async with session.post(tgi.url("t") + "/v1/chat/completions", json={"model": MODEL}) as response:
            assert response.status == 422
            assert (await response.text()).startswith("Failed to deserialize the JSON body into the target type")
        async with session.post(tgi.url("t") + "/v1/chat/completions", data=b"{nope") as response:
            assert response.status == 400
            assert (await response.text()).startswith("Failed to parse the request body as JSON")


# ----- stream chunks -------------------------------------------------------------------------------------


async def test_completion_stream_chunks(tgi):
    # router/src/server.rs:870-881 (id "", finish_reason "" on non-final chunks), :846-868 (the final chunk
    # carries usage, always: details is forced on, :795), lib.rs:1422-1430 ("eos_token" | "length" | ...)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True}
    _, raw = await stream_raw(tgi.url("t") + "/v1/completions", body)
    chunks = events(raw)[:-1]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["", "", "length"]
    assert all(c["object"] == "text_completion" and c["id"] == "" for c in chunks)
    assert "usage" not in chunks[0] and chunks[-1]["usage"]["completion_tokens"] == 3
    _, raw = await stream_raw(tgi.url("t") + "/v1/completions", {"model": MODEL, "prompt": "Hello", "stream": True})
    assert events(raw)[-2]["choices"][0]["finish_reason"] == "eos_token"  # a natural end


async def test_chat_stream_chunks(tgi):
    # router/src/chat.rs:97-130 (role on every delta, finish_reason null until the last), :136 (usage: null on
    # every chunk), lib.rs:1432-1438 ("stop" | "length" | "stop_sequence"), lib.rs:817 (id "")
    _, raw = await stream_raw(tgi.url("t") + "/v1/chat/completions", chat(max_tokens=3, ignore_eos=True, stream=True))
    chunks = events(raw)[:-1]
    assert next(iter(chunks[0])) == "object"
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["usage"] is None and c["id"] == "" for c in chunks)


async def test_chat_usage_chunk_only_with_include_usage(tgi):
    # router/src/chat.rs:265-296 (one chunk after the final one, choices []); lib.rs:1062-1069 (default false)
    for options, expected in ((None, False), ({}, False), ({"include_usage": True}, True)):
        body = chat(max_tokens=2, stream=True)
        if options is not None:
            body["stream_options"] = options
        _, raw = await stream_raw(tgi.url("t") + "/v1/chat/completions", body)
        chunks = events(raw)[:-1]
        assert (chunks[-1]["choices"] == [] and chunks[-1]["usage"] is not None) is expected


async def test_model_names_in_replies(tgi):
    # router/src/server.rs:1196-1200 (chat echoes the request's model unless absent or "tgi"), :812
    # (completions: the served model id)
    _, body, _ = await post_json(tgi.url("t") + "/v1/chat/completions", chat(max_tokens=2))
    assert body["model"] == MODEL and body["id"] == ""
    _, body, _ = await post_json(tgi.url("t") + "/v1/chat/completions", {**chat(max_tokens=2), "model": "adapter-1"})
    assert body["model"] == "adapter-1"
    _, body, _ = await completion(tgi.url("t"), prompt="Hi", max_tokens=2, model="adapter-1")
    assert body["model"] == MODEL


# ----- /info, /v1/models -----------------------------------------------------------------------------


async def test_info(tgi):
    # router/src/lib.rs:260-299, server.rs:2122-2143; version from Cargo.toml:24 ("3.3.6-dev0" on 3.3.6/3.3.7)
    status, raw, _ = await get(tgi.url("busy") + "/info")
    info = json.loads(raw)
    assert status == 200
    assert info["version"] == "3.3.6-dev0" and info["router"] == "text-generation-router"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (TOTAL - 1, TOTAL)
    assert info["max_concurrent_requests"] == 2 and info["model_id"] == MODEL
    assert "max_batch_total_tokens" not in info  # server.rs:2133-2136 (commented out)


async def test_models(tgi):
    # router/src/lib.rs:1521-1547
    _, raw, _ = await get(tgi.url("t") + "/v1/models")
    assert json.loads(raw) == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": MODEL}],
    }


async def test_generate_stream_errors_have_no_done(tgi):
    # router/src/server.rs:2428-2437, 496 (/generate_stream: {"error", "error_type"} in the stream, no [DONE])
    body = {"inputs": prompt(1000), "parameters": {"max_new_tokens": 600}}
    status, raw = await stream_raw(tgi.url("t") + "/generate_stream", body)
    assert status == 200
    (event,) = events(raw)
    assert event["error_type"] == "validation"


# ----- sse_space: false and older releases -----------------------------------------------------------------


async def test_sse_space_false_frames_without_a_space(tgi):
    _, raw = await stream_raw(tgi.url("nospace") + "/v1/chat/completions", chat(max_tokens=2, stream=True))
    assert events(raw, b"data:")[-1] == "[DONE]"


async def test_before_2_1_frames_without_a_space(tgi):
    # axum 0.6 (TGI <= 2.0.x) wrote "data:" without a space (axum commit 268ba08e)
    _, raw = await stream_raw(tgi.url("old") + "/v1/chat/completions", chat(max_tokens=2, stream=True))
    assert events(raw, b"data:")[-1] == "[DONE]"


async def test_before_3_1_1_max_new_tokens_is_validated_whole(tgi):
    # v2.4.1 router/src/validation.rs:146-151 (the full max_new_tokens); the 1024 rounds arrived in 8a211dc7 (v3.1.1)
    status, body, _ = await completion(tgi.url("old"), prompt=prompt(100), max_tokens=100_000)
    assert status == 422
    assert body["error"].endswith("Given: 100 `inputs` tokens and 100000 `max_new_tokens`")


async def test_before_3_0_generate_defaults_to_100_new_tokens(tgi):
    # v2.4.1 router/src/lib.rs:335, 395-397 (serde default 100); the automatic default arrived in 8c3669b2 (v3.0.0)
    status, body, _ = await post_json(tgi.url("old") + "/generate", {"inputs": prompt(1450)})
    assert status == 422
    assert body["error"].endswith("Given: 1450 `inputs` tokens and 100 `max_new_tokens`")
