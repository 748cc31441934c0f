"""SGLang adapter: OpenAI routes with our request id as ``rid`` (so it can be aborted by id)."""

from __future__ import annotations

import msgspec

from sloproxy.request import ProxyRequest

from .base import AdminCall, BackendLoad, UpstreamCall, metric_values, openai_route
from .openai_compat import OpenAICompatibleAdapter


def _rid(request: ProxyRequest) -> str:
    """One rid per attempt: a retried or evicted request must not collide with its late abort."""
    return f"{request.id}-{request.attempts}"


class SGLangAdapter(OpenAICompatibleAdapter):
    engine = "sglang"
    health_path = "/health"
    metrics_path = "/metrics"

    def engine_priority(self, request: ProxyRequest) -> int | None:
        """SGLang runs HIGHER values first (with ``--enable-priority-scheduling``)."""
        return -request.urgency_rank if self.priority_scheduling else None

    def build(self, request: ProxyRequest) -> UpstreamCall:
        body = dict(request.decoded_body())
        body["rid"] = _rid(request)
        if request.stream and not request.include_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        priority = self.engine_priority(request)
        if priority is None:
            body.pop("priority", None)
        else:
            body["priority"] = priority
        return UpstreamCall(openai_route(request), msgspec.json.encode(body), self.headers)

    def abort_call(self, request: ProxyRequest) -> UpstreamCall:
        return UpstreamCall("/abort_request", msgspec.json.encode({"rid": _rid(request)}), self.headers)

    # Memory release (one level: weights and KV cache; the engine keeps what it needs to resume).
    # SGLang has no route that reports the state: the swapper takes it as awake at start.
    _TAGS = msgspec.json.encode({"tags": ["weights", "kv_cache"]})

    def sleep_call(self, level: int) -> AdminCall:
        return AdminCall("POST", "/release_memory_occupation", self._TAGS)

    def wake_call(self) -> AdminCall:
        return AdminCall("POST", "/resume_memory_occupation", self._TAGS)

    def parse_load(self, metrics_text: str) -> BackendLoad:
        values = metric_values(metrics_text)
        usage = values.get("sglang:token_usage")
        used = values.get("sglang:num_used_tokens")
        capacity = int(used / usage) if used and usage else None
        generated = values.get("sglang:generation_tokens_total")
        return BackendLoad(
            running=int(values.get("sglang:num_running_reqs", 0)),
            waiting=int(values.get("sglang:num_queue_reqs", 0)),
            kv_usage=usage,
            kv_capacity_tokens=capacity,
            generation_tokens=None if generated is None else int(generated),
        )
