"""Context windows (sloproxy/context.py): each engine's length rule, where a request is placed, the
prompt's size bounds against the emulators' count, and the engines' refusals read back."""

from __future__ import annotations

import json

import msgspec
import pytest

from sloproxy.adapters.openai_compat import OpenAICompatibleAdapter
from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.adapters.tgi import TGIAdapter
from sloproxy.adapters.vllm import VLLMAdapter
from sloproxy.backends import BackendPool
from sloproxy.config import BackendConfig, ContextConfig, HealthConfig, LoadPolling
from sloproxy.context import (
    CONTEXT_CODE,
    ContextWindow,
    Fit,
    LengthRule,
    fit,
    prompt_size,
    quick_token_bound,
    refused_prompt_tokens,
)
from sloproxy.emulator.tokens import count_tokens, render_chat
from sloproxy.errors import ProxyError
from sloproxy.request import parse_request

REFUSE, CLAMP, TGI = LengthRule("refuse"), LengthRule("clamp"), LengthRule("refuse", checked_reply=1024)


def test_fit_follows_each_engines_rule() -> None:
    window = ContextWindow(4096)
    # a prompt that leaves no room for one reply token fits no engine (vLLM: "max_tokens must be at least 1")
    assert fit(CLAMP, window, 4096, None, clamp=True) == (Fit.NONE, None)
    assert fit(CLAMP, window, 4095, None, clamp=True) == (Fit.WHOLE, None)
    # vLLM 0.33 clamps prompt + max_tokens itself: the proxy sends the client's limit
    assert fit(CLAMP, window, 3000, 2000, clamp=False) == (Fit.CLAMPED, None)
    # ...but refuses a max_tokens larger than the whole window: the proxy clamps it, or the backend is out
    assert fit(CLAMP, window, 3000, 5000, clamp=True) == (Fit.CLAMPED, 1096)
    assert fit(CLAMP, window, 3000, 5000, clamp=False) == (Fit.NONE, None)
    # SGLang refuses it: the proxy clamps to the room left, or (clamping off) the backend is out
    assert fit(REFUSE, window, 3000, 2000, clamp=True) == (Fit.CLAMPED, 1096)
    assert fit(REFUSE, window, 3000, 2000, clamp=False) == (Fit.NONE, None)
    assert fit(REFUSE, window, 3000, 1096, clamp=False) == (Fit.WHOLE, None)
    # TGI checks the first 1,024 reply tokens only, then ends the reply at its window
    assert fit(TGI, window, 3000, 5000, clamp=False) == (Fit.CLAMPED, None)
    assert fit(TGI, window, 3100, 5000, clamp=False) == (Fit.NONE, None)
    assert fit(TGI, window, 3100, 5000, clamp=True) == (Fit.CLAMPED, 996)
    # TGI's own bound on the prompt alone
    assert fit(TGI, ContextWindow(4096, max_input=3000), 3001, 10, clamp=True) == (Fit.NONE, None)


def _pool(windows: dict[str, tuple[str, int | None]], clamp: bool = True) -> BackendPool:
    configs = [
        BackendConfig(name=n, engine=e, url=f"http://127.0.0.1:1/{n}", models=["m"]) for n, (e, _) in windows.items()
    ]
    pool = BackendPool(configs, HealthConfig(), LoadPolling(), context=ContextConfig(clamp_max_tokens=clamp))
    for backend in pool.backends:
        size = windows[backend.name][1]
        pool.set_context(backend, None if size is None else ContextWindow(size))
    return pool


def _chat(tokens: int, max_tokens: int | None = None) -> bytes:
    """A chat body whose prompt the emulators count as about ``tokens`` tokens (6-letter words)."""
    body: dict = {"model": "m", "messages": [{"role": "user", "content": " abcdef" * tokens}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def test_short_requests_are_not_looked_at() -> None:
    pool = _pool({"small": ("sglang", 4096), "big": ("vllm", 8192)})
    request = parse_request("chat", _chat(100, 256))
    pool.fit_by_window(request)
    assert request.excluded == set() and request.clamps is None


def test_a_long_prompt_goes_only_where_it_fits() -> None:
    pool = _pool({"small": ("sglang", 4096), "tgi": ("tgi", 4096), "big": ("vllm", 8192)})
    request = parse_request("chat", _chat(5000))
    pool.fit_by_window(request)
    assert request.excluded == {"small", "tgi"}
    assert [b.name for b in pool.candidates("m", ()) if b.name not in request.excluded] == ["big"]


def test_whole_fits_are_preferred_and_clamps_noted_where_the_engine_would_refuse() -> None:
    pool = _pool({"small": ("sglang", 4096), "big": ("sglang", 8192)})
    request = parse_request("chat", _chat(3000, 4096))
    pool.fit_by_window(request)
    assert request.excluded == {"small"} and request.clamps is None  # big holds it whole
    only_small = _pool({"small": ("sglang", 4096)})
    request = parse_request("chat", _chat(3000, 4096))
    only_small.fit_by_window(request)
    size = prompt_size(request)
    assert request.excluded == set()
    assert size.high > 4096 >= size.likely  # its bytes do not fit: the likely count places and clamps it
    assert request.clamps == {"small": 4096 - size.likely}
    off = _pool({"small": ("sglang", 4096)}, clamp=False)
    with pytest.raises(ProxyError) as caught:
        off.fit_by_window(parse_request("chat", _chat(3000, 4096)))
    assert caught.value.status == 400 and caught.value.param == "max_tokens" and caught.value.code == CONTEXT_CODE


def test_a_request_no_window_holds_is_a_400_naming_the_largest() -> None:
    pool = _pool({"small": ("tgi", 4096), "big": ("vllm", 8192)})
    with pytest.raises(ProxyError) as caught:
        pool.fit_by_window(parse_request("chat", _chat(40000)))
    error = caught.value
    assert (error.status, error.code, error.param) == (400, CONTEXT_CODE, "messages")
    assert "maximum context length is 8192 tokens" in error.message
    # a backend whose window is not known yet may hold it: no 400 from the proxy
    unknown = _pool({"small": ("tgi", 4096), "new": ("vllm", None)})
    request = parse_request("chat", _chat(40000))
    unknown.fit_by_window(request)
    assert request.excluded == {"small"}


def test_near_a_window_the_likely_count_decides_and_the_engine_has_the_last_word() -> None:
    # 7,900 emulator tokens: the upper bound (its bytes) is over 8,192, the likely count is not
    pool = _pool({"small": ("tgi", 4096), "big": ("vllm", 8192)})
    request = parse_request("chat", _chat(7900))
    size = prompt_size(request)
    assert size.high > 8191 >= size.likely
    pool.fit_by_window(request)
    assert request.excluded == {"small"}
    # the engine refused it all the same, naming its count: none left, its 400 stands (with OpenAI's code)
    error = ProxyError(
        400,
        (
            "This model's maximum context length is 8192 tokens. However, your prompt contains 8300 "
            "input tokens, which exceeds this limit even without any output tokens."
        ),
    )
    assert not pool.reroute_after_refusal(request, pool.backends[1], error)
    assert request.prompt_token_count == 8300 and error.code == CONTEXT_CODE and error.param == "messages"


def test_a_refusal_reroutes_to_a_larger_window() -> None:
    pool = _pool({"small": ("tgi", 4096), "big": ("vllm", 8192)})
    pool.set_context(pool.backends[0], None)  # not learned yet
    request = parse_request("chat", _chat(5000))
    pool.fit_by_window(request)
    assert request.excluded == set()
    refusal = ProxyError(400, "Input validation error: `inputs` must have less than 4095 tokens. Given: 5040")
    assert pool.reroute_after_refusal(request, pool.backends[0], refusal)
    assert request.excluded == {"small"} and request.prompt_token_count == 5040
    pool.fit_by_window(request)  # the next acquire: the engine's count now
    assert request.excluded == {"small"}
    assert not pool.reroute_after_refusal(request, pool.backends[1], ProxyError(400, "`temperature` must be positive"))


@pytest.mark.parametrize(
    ("message", "count"),
    [
        # vLLM 0.33 (vllm/renderers/params.py, see tests/test_contract_vllm.py)
        (
            (
                "This model's maximum context length is 4096 tokens. However, your prompt contains at "
                "least 4097 input tokens, which exceeds this limit even without any output tokens."
            ),
            4097,
        ),
        # vLLM before 0.10
        (
            (
                "This model's maximum context length is 4096 tokens. However, your request has 5000 input "
                "tokens. Please reduce the length of the input messages."
            ),
            5000,
        ),
        # SGLang 0.5 (tokenizer_manager.py) and its scheduler
        ("The input (5000 tokens) is longer than the model's context length (4096 tokens).", 5000),
        (
            (
                "Requested token count exceeds the model's maximum context length of 4096 tokens. You "
                "requested a total of 6000 tokens: 3000 tokens from the input messages and 3000 tokens for "
                "the completion."
            ),
            3000,
        ),
        (
            (
                "Input length (4092 tokens) exceeds the maximum allowed length (4090 tokens). Use a "
                "shorter input or enable --allow-auto-truncate."
            ),
            4092,
        ),
        # TGI 3.3 (router/src/validation.rs)
        (
            (
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 3500 "
                "`inputs` tokens and 1024 `max_new_tokens`"
            ),
            3500,
        ),
        ("Input validation error: `inputs` must have less than 4095 tokens. Given: 5000", 5000),
    ],
)
def test_engines_length_refusals_are_read_back(message: str, count: int) -> None:
    assert refused_prompt_tokens(ProxyError(400, message)) == count


def test_other_errors_are_not_length_refusals() -> None:
    assert refused_prompt_tokens(ProxyError(400, "max_tokens must be at least 1, got 0.")) is None
    assert refused_prompt_tokens(ProxyError(503, "This model's maximum context length is 4 tokens.")) is None
    assert refused_prompt_tokens(ProxyError(400, "The model `x` does not exist.")) is None


@pytest.mark.parametrize("words", [10, 1000, 8000, 30000])
def test_prompt_size_brackets_the_emulators_count_on_long_prompts(shared_data, words: int) -> None:
    """The emulators count with one rule (emulator/tokens.py): the proxy's likely count is never below
    it (what the engine sees is the rendered chat), and its bounds bracket it."""
    lines = [json.loads(line)["instruction"] for line in (shared_data / "lengths" / "alpaca_eval_prompts.jsonl").open()]
    text, i = "", 0
    while count_tokens(text) < words:
        text += lines[i % len(lines)] + "\n"
        i += 1
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    request = parse_request("chat", msgspec.json.encode({"model": "m", "messages": messages}))
    engine = count_tokens(render_chat(messages))
    size = prompt_size(request)
    assert size.low <= engine <= size.likely <= size.high <= quick_token_bound(request)
    assert size.likely - engine <= 64  # the template's allowance, not a share of the prompt


def test_an_engine_count_that_fits_once_clamped_keeps_the_backend() -> None:
    """SGLang refused prompt + max_tokens, naming its count: the same backend serves it with the limit cut."""
    pool = _pool({"small": ("sglang", 4096)})
    pool.set_context(pool.backends[0], None)
    request = parse_request("chat", _chat(3000, 4000))
    pool.fit_by_window(request)
    pool.set_context(pool.backends[0], ContextWindow(4096))  # learned meanwhile
    refusal = ProxyError(
        400,
        "Requested token count exceeds the model's maximum context length of 4096 tokens. You requested a total of "
        "7010 tokens: 3010 tokens from the input messages and 4000 tokens for the completion.",
    )
    assert pool.reroute_after_refusal(request, pool.backends[0], refusal)
    assert request.excluded == set() and request.prompt_token_count == 3010
    pool.fit_by_window(request)
    assert request.clamps == {"small": 4096 - 3010}
    # the same refusal again says nothing new: the backend is out, and nothing is left
    assert not pool.reroute_after_refusal(request, pool.backends[0], refusal)


def test_prompt_size_of_token_ids_and_non_ascii_text() -> None:
    ids = parse_request("completions", b'{"model": "m", "prompt": [1, 2, 3, 4, 5]}')
    assert prompt_size(ids).likely == prompt_size(ids).low == 5
    wide = parse_request(
        "chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "排队论" * 100}]}).encode()
    )
    assert prompt_size(wide).high >= 4 * 300  # up to 4 tokens per rare CJK character: their \\u escapes
    raw_utf8 = parse_request(
        "chat",
        json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "排队论" * 100}]}, ensure_ascii=False
        ).encode(),
    )
    assert quick_token_bound(raw_utf8) >= 900  # bytes bound tokens from above in byte-level BPE


def test_adapters_read_their_engines_windows() -> None:
    models = frozenset({"llama"})
    vllm_models = b'{"object":"list","data":[{"id":"llama","object":"model","max_model_len":8192}]}'
    assert VLLMAdapter().parse_context(vllm_models, models) == ContextWindow(8192)
    # SGLang: its scheduler refuses a prompt of context_len - 6 tokens or more
    assert SGLangAdapter().parse_context(vllm_models, models) == ContextWindow(8192, 8186)
    info = b'{"model_id":"x","max_input_tokens":4095,"max_total_tokens":4096,"version":"3.3.6-dev0"}'
    assert TGIAdapter().parse_context(info, models) == ContextWindow(4096, 4095)
    assert VLLMAdapter().parse_context(b'{"data": []}', models) is None
    assert TGIAdapter().parse_context(b"not json", models) is None
    assert OpenAICompatibleAdapter().parse_context(vllm_models, models) is None  # from the config only


def test_adapters_send_the_clamped_limit() -> None:
    for adapter in (VLLMAdapter(), SGLangAdapter(), TGIAdapter(), OpenAICompatibleAdapter()):
        for field in ("max_tokens", "max_completion_tokens"):
            request = parse_request(
                "chat",
                json.dumps(
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: 9000, "stream": True}
                ).encode(),
            )
            request.clamped_to = 1000
            sent = json.loads(adapter.build(request).body)
            assert sent[field] == 1000, (adapter.engine, field)
            request.clamped_to = None
            assert json.loads(adapter.build(request).body)[field] == 9000


def test_engine_openai_needs_its_window_in_the_config() -> None:
    from sloproxy.config import ConfigError, parse_config

    backend = {"name": "o", "engine": "openai", "url": "https://api.example.com", "models": ["gpt-x"]}
    with pytest.raises(ConfigError, match=r"backends\[0\]`.max_context_tokens is required"):
        parse_config({"backends": [backend]})
    config = parse_config({"backends": [{**backend, "max_context_tokens": 128000}]})
    pool = BackendPool(config.backends, HealthConfig(), LoadPolling())
    assert pool.backends[0].context == ContextWindow(128000, source="config")
