"""SGLang adapter: reads load from ``sglang:*`` metrics."""

from __future__ import annotations

from .base import BackendLoad, EngineAdapter, metric_values


class SGLangAdapter(EngineAdapter):
    engine = "sglang"

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
