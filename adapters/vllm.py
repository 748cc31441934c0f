"""vLLM adapter: its OpenAI routes pass through; load from ``vllm:*`` metrics (old and new names)."""

from __future__ import annotations

from sloproxy.request import ProxyRequest

from .base import AdminCall, BackendLoad, decode_json, labels_of, metric_values
from .openai_compat import OpenAICompatibleAdapter


class VLLMAdapter(OpenAICompatibleAdapter):
    engine = "vllm"
    health_path = "/health"
    metrics_path = "/metrics"

    def engine_priority(self, request: ProxyRequest) -> int | None:
        """vLLM runs lower values first, and only accepts them with ``--scheduling-policy priority``."""
        return request.urgency_rank if self.priority_scheduling else None

    # Sleep mode: the server must run with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode.
    def sleep_call(self, level: int) -> AdminCall:
        return AdminCall("POST", f"/sleep?level={level}")

    def wake_call(self) -> AdminCall:
        return AdminCall("POST", "/wake_up")

    def is_sleeping_call(self) -> AdminCall:
        return AdminCall("GET", "/is_sleeping")

    def parse_is_sleeping(self, body: bytes) -> bool | None:
        answer = decode_json(body)
        value = answer.get("is_sleeping") if isinstance(answer, dict) else None
        return value if isinstance(value, bool) else None

    def parse_load(self, metrics_text: str) -> BackendLoad:
        values = metric_values(metrics_text)
        usage = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc"))
        capacity = None
        info = labels_of(metrics_text, "vllm:cache_config_info")
        if info and info.get("num_gpu_blocks", "").isdigit() and info.get("block_size", "").isdigit():
            capacity = int(info["num_gpu_blocks"]) * int(info["block_size"])
        preemptions = values.get("vllm:num_preemptions_total")
        generated = values.get("vllm:generation_tokens_total")
        return BackendLoad(
            running=int(values.get("vllm:num_requests_running", 0)),
            waiting=int(values.get("vllm:num_requests_waiting", 0)),
            kv_usage=usage,
            kv_capacity_tokens=capacity,
            preemptions=None if preemptions is None else int(preemptions),
            generation_tokens=None if generated is None else int(generated),
        )
