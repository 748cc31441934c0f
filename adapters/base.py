"""What every engine adapter provides. Engine dialects live only in adapters.

An adapter turns a client's OpenAI request into its engine's call, turns the engine's
replies, streams and errors back into exactly what OpenAI clients expect, and reads the
engine's load from its ``/metrics``. The proxy core never looks at an engine's wire format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from sloproxy.context import ContextWindow, LengthRule
from sloproxy.errors import ProxyError

if TYPE_CHECKING:
    from sloproxy.request import ProxyRequest

DONE_FRAME = b"data: [DONE]\n\n"


class BackendLoad(msgspec.Struct, frozen=True):
    """One backend's load as read from its metrics; ``None`` where the engine does not say."""

    running: int
    waiting: int
    kv_usage: float | None = None  # 0..1
    kv_capacity_tokens: int | None = None
    preemptions: int | None = None
    generation_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


@dataclass(slots=True)
class UpstreamCall:
    """One HTTP request to an engine."""

    path: str
    body: bytes
    headers: dict[str, str]


class Metrics:
    """One ``/metrics`` page: each sample name's values with their labels (one model per engine)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def has(self, name: str) -> bool:
        return name in self.samples

    def total(self, name: str) -> float | None:
        """The sum over label sets (data-parallel ranks add up). Where a gauge is also broken down by
        priority (SGLang with priority scheduling exports the total as ``priority=""`` beside one series
        per priority), only the totals are summed, not the breakdown too."""
        found = self.samples.get(name)
        if found is None:
            return None
        if any("priority" in labels for labels, _ in found):
            totals = [value for labels, value in found if labels.get("priority", "") == ""]
            if totals:
                return sum(totals)
        return sum(value for _, value in found)

    def highest(self, name: str) -> float | None:
        """The largest value over label sets: a share (KV usage) over data-parallel ranks, whose
        fullest rank is what refuses the next request first."""
        found = self.samples.get(name)
        return None if not found else max(value for _, value in found)

    def labels(self, name: str) -> dict[str, str] | None:
        found = self.samples.get(name)
        return found[0][0] if found else None


def as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def openai_route(request: ProxyRequest) -> str:
    return "/v1/chat/completions" if request.kind == "chat" else "/v1/completions"


def record_usage(request: ProxyRequest, usage: Usage | None) -> None:
    if usage is not None:
        request.prompt_tokens = usage.prompt_tokens
        request.completion_tokens = usage.completion_tokens


@dataclass(frozen=True, slots=True)
class AdminCall:
    """One engine management call (sleep, wake, sleep state): not on the request path."""

    method: str
    path: str
    body: bytes = b""


class StreamTranslator(ABC):
    """Per request: each upstream SSE payload in, the bytes to send the client out."""

    def __init__(self, request: ProxyRequest) -> None:
        self.request = request
        self.done = False  # saw the engine's end of stream
        self.failed = False  # the engine reported an error inside the stream
        self.failure: ProxyError | None = None

    @abstractmethod
    def feed(self, payload: bytes) -> bytes:
        """Client bytes for one upstream event payload (``b""`` to send nothing)."""

    def unchanged(self, events: bytes) -> bool:
        """True if these complete upstream events (``data: …`` frames) go to the client exactly as
        they are, so the proxy can skip splitting and re-framing them. Default: never."""
        return False

    def unchanged_until(self, events: bytes, start: int = 0) -> int:
        """Where the run of events from ``start`` that go to the client as they are ends (a whole
        number of events; ``start``: none). A read that holds many events (a backend sending faster
        than the proxy reads, the usage chunk and ``[DONE]`` behind the last tokens) then needs only
        the events that need a look split and translated. Default: all or nothing, by :meth:`unchanged`."""
        return len(events) if self.unchanged(events[start:] if start else events) else start

    def error(self, status: int, message: str) -> bytes:
        """The engine reported an error inside the stream: an OpenAI error frame, then [DONE]."""
        self.failed = True
        self.done = True
        self.failure = ProxyError(status, message)
        return b"data: " + self.failure.body() + b"\n\n" + DONE_FRAME


class EngineAdapter(ABC):
    """Base class; one subclass per engine kind, registered in the ``sloproxy.adapters`` group."""

    engine: ClassVar[str]
    health_path: ClassVar[str] = "/health"
    metrics_path: ClassVar[str | None] = "/metrics"
    # The engine's rule for prompt + max_tokens over its window (context.py), and where it says its window.
    length_rule: ClassVar[LengthRule] = LengthRule("refuse")
    context_path: ClassVar[str | None] = None

    @abstractmethod
    def build(self, request: ProxyRequest) -> UpstreamCall:
        """The engine call for a client request."""

    @abstractmethod
    def stream_translator(self, request: ProxyRequest) -> StreamTranslator:
        """A translator for this request's stream."""

    @abstractmethod
    def translate_reply(self, request: ProxyRequest, body: bytes) -> bytes:
        """The client body for a successful non-streamed reply; records token usage."""

    @abstractmethod
    def translate_error(self, status: int, body: bytes) -> ProxyError:
        """The OpenAI-format error for an engine's error reply."""

    @abstractmethod
    def parse_load(self, metrics_text: str) -> BackendLoad | None:
        """The backend's load from the text of its ``/metrics`` route; None when the page lacks the
        engine's load families (vLLM with ``--disable-log-stats`` still answers 200): load unknown,
        which routing treats as a stale reading, never as an idle engine."""

    # A reply header in which the engine reports its load with every (non-streamed) reply; None: none.
    reply_load_header: ClassVar[bytes | None] = None

    def parse_reply_load(self, value: bytes, last: BackendLoad | None) -> BackendLoad | None:
        """The load a reply's :attr:`reply_load_header` reports, merged into the last reading (the
        header carries only some figures); None when it says nothing usable."""
        return None

    def parse_context(self, body: bytes, models: frozenset[str]) -> ContextWindow | None:
        """The window the engine reports at :attr:`context_path` (None: it does not say)."""
        return None

    def abort_call(self, request: ProxyRequest) -> UpstreamCall | None:
        """A call that aborts ``request`` inside the engine; None: closing the connection does it."""
        return None

    # Model swapping (sloproxy/swapping.py). None: the engine has no such API, so a backend of it in a
    # GPU group is stopped and started by the restart hooks of its config instead.
    def sleep_call(self, level: int) -> AdminCall | None:
        """Free the GPU: level 1 keeps the weights in host memory (fast wake), level 2 drops them."""
        return None

    def wake_call(self) -> AdminCall | None:
        """Load the weights and KV cache back after :meth:`sleep_call`."""
        return None

    def is_sleeping_call(self) -> AdminCall | None:
        """Ask whether the engine sleeps (read at start); None: it cannot say."""
        return None

    def parse_is_sleeping(self, body: bytes) -> bool | None:
        """The answer to :meth:`is_sleeping_call`; None when unreadable."""
        return None


def decode_json(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
