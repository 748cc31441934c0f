"""What every engine adapter provides. Engine dialects live only in adapters.

At this stage an adapter reads its engine's load from the engine's own ``/metrics`` text;
request translation and stream conversion join it with the proxy core.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import msgspec
from prometheus_client.parser import text_string_to_metric_families


class BackendLoad(msgspec.Struct, frozen=True):
    """One backend's load as read from its metrics; ``None`` where the engine does not say."""

    running: int
    waiting: int
    kv_usage: float | None = None  # 0..1
    kv_capacity_tokens: int | None = None
    preemptions: int | None = None
    generation_tokens: int | None = None


def metric_values(text: str) -> dict[str, float]:
    """Sum each sample name over its label sets (one model per engine process)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def labels_of(text: str, sample_name: str) -> dict[str, str] | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name:
                return dict(sample.labels)
    return None


class EngineAdapter(ABC):
    """Base class; subclasses set ``engine`` and implement :meth:`parse_load`."""

    engine: ClassVar[str]

    @abstractmethod
    def parse_load(self, metrics_text: str) -> BackendLoad:
        """The backend's load from the text of its ``/metrics`` route."""
