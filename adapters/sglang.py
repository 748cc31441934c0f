"""SGLang adapter: OpenAI routes with our request id as ``rid`` (so it can be aborted by id)."""

from __future__ import annotations

import msgspec

from sloproxy.context import ContextWindow
from sloproxy.request import ProxyRequest

from .base import AdminCall, BackendLoad, Metrics, UpstreamCall, as_int, openai_route
from .openai_compat import OpenAICompatibleAdapter, clamp_reply_limit, window_from_models


def _rid(request: ProxyRequest) -> str:
    """One rid per attempt: a retried or evicted request must not collide with its late abort."""
    return f"{request.id}-{request.attempts}"


class SGLangAdapter(OpenAICompatibleAdapter):
    engine = "sglang"
    health_path = "/health"
    metrics_path = "/metrics"
    # Refuses prompt + max_tokens over context_len (the default rule). /server_info's context_length is
    # null unless set by flag; /v1/models has the effective one. Its scheduler also refuses a prompt of
    # max_req_input_len = context_len - 6 tokens or more (tests/test_contract_sglang.py).
    context_path = "/v1/models"
    PROMPT_MARGIN = 6

    def parse_context(self, body: bytes, models: frozenset[str]) -> ContextWindow | None:
        window = window_from_models(body, models, "max_model_len")
        if window is None:
            return None
        return ContextWindow(window.total, window.total - self.PROMPT_MARGIN)

    def engine_priority(self, request: ProxyRequest) -> int | None:
        """SGLang runs HIGHER values first (with ``--enable-priority-scheduling``)."""
        return -request.urgency_rank if self.priority_scheduling else None

    def build(self, request: ProxyRequest) -> UpstreamCall:
        spliced = self._spliced(request)
        if spliced is not None:
            return UpstreamCall(openai_route(request), spliced, self.headers)
        body = dict(request.decoded_body())
        body["rid"] = _rid(request)
        if request.stream and not request.include_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if request.clamped_to is not None:
            clamp_reply_limit(body, request.clamped_to)
        priority = self.engine_priority(request)
        if priority is None:
            body.pop("priority", None)
        else:
            body["priority"] = priority
        return UpstreamCall(openai_route(request), msgspec.json.encode(body), self.headers)

    def _spliced(self, request: ProxyRequest) -> bytes | None:
        """The client's body with the fields the proxy sets written at its end, without decoding and
        re-encoding the prompt (a JSON object's last field of a name wins in SGLang's parser, so ``rid``
        and ``priority`` are the proxy's even where the client sent its own); None where the client's
        ``stream_options`` must be merged or the reply limit changes (the body is rebuilt then)."""
        if request.stream_options_given or request.clamped_to is not None:
            return None
        raw = request.raw.rstrip()
        if not raw.endswith(b"}"):
            return None
        tail = [b'"rid":"', _rid(request).encode(), b'"']
        if request.stream and not request.include_usage:
            tail.append(b',"stream_options":{"include_usage":true}')
        priority = self.engine_priority(request)
        if priority is not None:
            tail.append(b',"priority":%d' % priority)
        elif request.priority_given:
            return None  # the client's priority must go: only a rebuilt body drops it
        body = raw[:-1].rstrip()
        return b"".join([body, b"" if body.endswith(b"{") else b",", *tail, b"}"])

    def abort_call(self, request: ProxyRequest) -> UpstreamCall:
        return UpstreamCall("/abort_request", msgspec.json.encode({"rid": _rid(request)}), self.headers)

    # Memory release (one level: weights and KV cache; the engine keeps what it needs to resume).
    # SGLang has no route that reports the state: the swapper takes it as awake at start.
    _TAGS = msgspec.json.encode({"tags": ["weights", "kv_cache"]})

    def sleep_call(self, level: int) -> AdminCall:
        return AdminCall("POST", "/release_memory_occupation", self._TAGS)

    def wake_call(self) -> AdminCall:
        return AdminCall("POST", "/resume_memory_occupation", self._TAGS)

    def parse_load(self, metrics_text: str) -> BackendLoad | None:
        metrics = Metrics(metrics_text)
        running, waiting = metrics.total("sglang:num_running_reqs"), metrics.total("sglang:num_queue_reqs")
        if running is None or waiting is None:
            return None
        capacity = metrics.highest("sglang:max_total_num_tokens")
        if capacity is None:  # before 0.5: derived from tokens in use and their share
            usage, used = metrics.highest("sglang:token_usage"), metrics.highest("sglang:num_used_tokens")
            capacity = used / usage if used and usage else None
        return BackendLoad(
            running=int(running),
            waiting=int(waiting),
            kv_usage=metrics.highest("sglang:token_usage"),
            kv_capacity_tokens=as_int(capacity),
            generation_tokens=as_int(metrics.total("sglang:generation_tokens_total")),
        )
