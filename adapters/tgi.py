"""TGI adapter: reads load from ``tgi_*`` metrics (no model label; counters without ``_total``)."""

from __future__ import annotations

from .base import BackendLoad, EngineAdapter, metric_values


class TGIAdapter(EngineAdapter):
    engine = "tgi"

    def parse_load(self, metrics_text: str) -> BackendLoad:
        values = metric_values(metrics_text)
        capacity = values.get("tgi_batch_max_total_tokens")
        held = values.get("tgi_batch_current_max_tokens")
        usage = held / capacity if capacity and held is not None else None
        return BackendLoad(
            running=int(values.get("tgi_batch_current_size", 0)),
            waiting=int(values.get("tgi_queue_size", 0)),
            kv_usage=usage,
            kv_capacity_tokens=None if capacity is None else int(capacity),
        )
