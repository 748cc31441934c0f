"""vLLM adapter: its OpenAI routes pass through; load from ``vllm:*`` metrics (old and new names)."""

from __future__ import annotations

import msgspec

from sloproxy.context import ContextWindow, LengthRule
from sloproxy.request import ProxyRequest

from .base import AdminCall, BackendLoad, Metrics, UpstreamCall, as_int, decode_json
from .openai_compat import OpenAICompatibleAdapter, window_from_models


class VLLMAdapter(OpenAICompatibleAdapter):
    engine = "vllm"
    health_path = "/health"
    metrics_path = "/metrics"
    length_rule = LengthRule("clamp")  # 0.33 clamps prompt + max_tokens to max_model_len (tests/test_contract_vllm.py)
    context_path = "/v1/models"
    priority_header = "X-Vllm-Priority"  # 0.33: overrides the body's priority (tests/test_contract_vllm.py)
    # ORCA: asked for per request, sent only with non-streamed successes, with the waiting count and the KV
    # usage (no running count): a fresher reading of those two between polls (tests/test_contract_vllm.py).
    reply_load_header = b"endpoint-load-metrics"

    def build(self, request: ProxyRequest) -> UpstreamCall:
        call = super().build(request)
        if not request.stream:
            call.headers["endpoint-load-metrics-format"] = "TEXT"
        return call

    def parse_reply_load(self, value: bytes, last: BackendLoad | None) -> BackendLoad | None:
        """``TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=0.0``."""
        if last is None or not value.startswith(b"TEXT "):
            return None
        figures: dict[str, float] = {}
        for item in value[5:].split(b","):
            name, _, number = item.strip().partition(b"=")
            try:
                figures[name.decode().removeprefix("named_metrics.")] = float(number)
            except ValueError:
                continue
        waiting, usage = figures.get("num_requests_waiting"), figures.get("kv_cache_usage_perc")
        if waiting is None and usage is None:
            return None  # stats logging off: an empty report
        return msgspec.structs.replace(
            last,
            waiting=last.waiting if waiting is None else int(waiting),
            kv_usage=last.kv_usage if usage is None else usage,
        )

    def parse_context(self, body: bytes, models: frozenset[str]) -> ContextWindow | None:
        return window_from_models(body, models, "max_model_len")

    def engine_priority(self, request: ProxyRequest) -> int | None:
        """vLLM runs lower values first, and only accepts them with ``--scheduling-policy priority``."""
        return request.urgency_rank if self.priority_scheduling else None

    # Sleep mode: the server must run with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode.
    def sleep_call(self, level: int) -> AdminCall:
        # 0.33 aborts whatever runs unless told to wait (mode=wait); the swapper has drained it by then,
        # and an older vLLM ignores the parameter (tests/test_contract_vllm.py).
        return AdminCall("POST", f"/sleep?level={level}&mode=wait")

    def wake_call(self) -> AdminCall:
        return AdminCall("POST", "/wake_up")

    def is_sleeping_call(self) -> AdminCall:
        return AdminCall("GET", "/is_sleeping")

    def parse_is_sleeping(self, body: bytes) -> bool | None:
        answer = decode_json(body)
        value = answer.get("is_sleeping") if isinstance(answer, dict) else None
        return value if isinstance(value, bool) else None

    def parse_load(self, metrics_text: str) -> BackendLoad | None:
        metrics = Metrics(metrics_text)
        running, waiting = metrics.total("vllm:num_requests_running"), metrics.total("vllm:num_requests_waiting")
        if running is None or waiting is None:
            return None
        usage = metrics.highest("vllm:kv_cache_usage_perc")
        if usage is None:
            usage = metrics.highest("vllm:gpu_cache_usage_perc")  # before 0.10
        return BackendLoad(
            running=int(running),
            waiting=int(waiting),
            kv_usage=usage,
            kv_capacity_tokens=_kv_capacity(metrics.labels("vllm:cache_config_info")),
            preemptions=as_int(metrics.total("vllm:num_preemptions_total")),
            generation_tokens=as_int(metrics.total("vllm:generation_tokens_total")),
        )


def _kv_capacity(info: dict[str, str] | None) -> int | None:
    """KV tokens per rank: the ``kv_cache_size_tokens`` label where the engine gives it, else blocks x size."""
    if not info:
        return None
    if info.get("kv_cache_size_tokens", "").isdigit():
        return int(info["kv_cache_size_tokens"])
    if info.get("num_gpu_blocks", "").isdigit() and info.get("block_size", "").isdigit():
        return int(info["num_gpu_blocks"]) * int(info["block_size"])
    return None
