"""The one request object: everything the proxy knows about a request lives here.

Parsed once at the edge: the JSON body is decoded to a dict (unknown fields are kept and
passed through to engines that accept them) and validated against the few fields the proxy
itself relies on, with errors that name the field.
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from .body_limits import chat_siblings, nesting_exceeds, prompt_chars
from .config import Limits
from .errors import ProxyError
from .slo import SLOClass

DEFAULT_OUTPUT_TOKENS = 256  # reply-length guess when the client sets no max_tokens (until the predictor)
_arrival_seq = itertools.count(1)

Kind = Literal["chat", "completions"]

# Request ids: a random per-process prefix and a counter (unique across replicas, no syscall per request).
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


class _Message(msgspec.Struct):
    role: str
    content: str | list[Any] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatFields(msgspec.Struct):
    model: str
    messages: list[_Message]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    priority: int | None = None
    temperature: float | None = None
    ignore_eos: bool = False  # vLLM / SGLang / TGI extension: the reply runs to the limit


class _CompletionFields(msgspec.Struct):
    model: str
    prompt: str | list[str | int | list[int]]  # text, texts, token ids, or lists of token ids
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    n: int = 1
    priority: int | None = None
    temperature: float | None = None
    ignore_eos: bool = False  # vLLM / SGLang / TGI extension: the reply runs to the limit


# One typed pass over the client's bytes validates what the proxy relies on (unknown fields are
# skipped here and pass through in the raw body); the full dict is decoded only if an adapter needs it.
_DECODERS = {"chat": msgspec.json.Decoder(_ChatFields), "completions": msgspec.json.Decoder(_CompletionFields)}


@dataclass(slots=True, eq=False)
class ProxyRequest:
    id: str
    kind: Kind
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    raw: bytes
    stream_options_given: bool = False  # the client sent ``stream_options`` (adapters must merge, not prepend)
    priority_given: bool = False  # the client sent ``priority``
    body: dict[str, Any] | None = None  # decoded from ``raw`` on first use: see ``decoded_body``
    prompt: Any = None  # chat messages (typed) or the completion prompt, as validated: the predictor reads it
    max_tokens: int | None = None  # the client's reply limit (max_completion_tokens or max_tokens)
    temperature: float | None = None
    ignore_eos: bool = False
    received_at: float = field(default_factory=time.monotonic)
    prompt_tokens: int | None = None  # learned from the engine's usage
    completion_tokens: int | None = None
    backend: str | None = None
    attempts: int = 0
    disconnected: bool = False  # the client went away before its reply ended
    failed_mid_stream: bool = False  # its stream broke after the client had bytes (an error frame ended it)
    client_request_id: str | None = None  # X-Request-Id as the client sent it (for logs), never a key
    # Scheduling: filled by the classifier (tenant, class) and the estimates below.
    seq: int = field(default_factory=lambda: next(_arrival_seq))  # arrival order, unique
    tenant: str = "default"
    slo: SLOClass | None = None
    band: int = 0
    priority: int = 0  # request-level, inside the band; lower first (vLLM's convention)
    deadline: float | None = None  # monotonic: the end-to-end budget of the class
    urgent_deadline: float | None = None  # the first deadline that can be missed (TTFT if the class has one)
    est_prompt_tokens: int = 0
    est_output_tokens: int = DEFAULT_OUTPUT_TOKENS  # what scheduling assumes: the predicted p50 when predicting
    pred_p50: float | None = None  # predicted reply length in tokens (None: no prediction was made)
    pred_p90: float | None = None
    estimate_source: str = "default"  # default (own guess) | prior (model's median) | model | exact | oracle
    kv_reserved: int = 0  # tokens of KV this request is counted for on its backend while in flight
    prediction: Any = None  # the predictor's record of it (features), for online learning when the reply ends
    excluded: set[str] = field(default_factory=set)  # backends not to try (retries, windows too small)
    prompt_token_count: int | None = None  # an engine's own count, from its refusal (context.py)
    clamps: dict[str, int] | None = None  # backend name -> reply limit the proxy sends there (context.py)
    clamped_to: int | None = None  # the reply limit this attempt's engine call carries (None: the client's)
    regions: tuple[str, ...] | None = None  # region preference, first first (regions.py; None: one region)
    region: str | None = None  # held-back work: the region it was held for and goes to
    tokens_charged: int = 0  # counted against the tenant's tokens per minute at admission (ratelimit.py)
    _prefix_hashes: list[int] | None = None  # computed on first use (only prefix-aware routing needs them)
    first_byte_sent: bool = False  # once true, the request can no longer move to another backend
    first_token_at: float | None = None  # monotonic; set on the first streamed content
    evict: Callable[[], None] | None = None  # set while on a backend: aborts the upstream call
    evicted: bool = False
    evictions: int = 0  # times the scheduler moved it to another backend
    # Observability (forward.py stamps these around ``scheduler.acquire``; monotonic seconds).
    queued_at: float | None = None  # the last acquire began
    dispatched_at: float | None = None  # the last acquire returned a backend
    queue_wait_s: float = 0.0  # summed over attempts
    trace: Any = None  # a tracing.RequestTrace while tracing is on, else None

    def decoded_body(self) -> dict[str, Any]:
        """The client's JSON body as a dict, decoded on first use (pass-through engines never need it)."""
        if self.body is None:
            self.body = msgspec.json.decode(self.raw)
        return self.body

    @property
    def prefix_hashes(self) -> list[int]:
        """Chained hashes of the prompt's leading blocks (see :func:`prefix_hashes`)."""
        if self._prefix_hashes is None:
            self._prefix_hashes = prefix_hashes(self.decoded_body())
        return self._prefix_hashes

    @prefix_hashes.setter
    def prefix_hashes(self, value: list[int]) -> None:
        self._prefix_hashes = value

    @property
    def urgency_rank(self) -> int:
        """The common priority scale adapters map onto engines: band first, then the request's own
        priority; lower runs earlier."""
        return self.band * 1000 + max(-999, min(999, self.priority))

    @property
    def tokens_used(self) -> int | None:
        """Prompt + completion tokens the engine reported (None until it did)."""
        if self.prompt_tokens is None:
            return None
        return self.prompt_tokens + (self.completion_tokens or 0)

    def classify(self, tenant: str, slo: SLOClass, band: int | None = None) -> None:
        """Attach the tenant and class (and the tenant's band, if it fixes one), and the deadlines
        they imply from the arrival time."""
        self.tenant, self.slo, self.band = tenant, slo, slo.band if band is None else band
        budget = slo.budget_s(self.est_output_tokens)
        self.deadline = None if budget is None else self.received_at + budget
        if slo.ttft_s is not None:
            self.urgent_deadline = self.received_at + slo.ttft_s
        else:
            self.urgent_deadline = self.deadline


def kv_footprint(request: ProxyRequest) -> int:
    """KV tokens a request may come to hold: its prompt plus the predicted p90 reply (the p50 estimate
    without a prediction), bounded by the client's limit. KV admission reserves this much."""
    reply = request.pred_p90 if request.pred_p90 is not None else request.est_output_tokens
    if request.max_tokens is not None:
        reply = min(reply, request.max_tokens)
    return request.est_prompt_tokens + int(reply)


def _validation_message(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    text = str(exc)
    param = None
    if "`$." in text:
        param = text.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0].split(".", 1)[0]
    return text, param


DEFAULT_LIMITS = Limits()


def parse_request(
    kind: Kind, raw: bytes, request_id: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> ProxyRequest:
    """Decode and validate a client body; raises :class:`ProxyError` (400) on bad input, including
    input over ``limits`` (nesting, prompt size, ``n``, reply tokens) so none of it costs more later."""
    try:
        fields = _DECODERS[kind].decode(raw)
    except msgspec.ValidationError as exc:  # well-formed JSON of the wrong shape
        if raw.lstrip()[:1] not in (b"{", b""):
            raise ProxyError(400, "The request body must be a JSON object.") from None
        message, param = _validation_message(exc)
        raise ProxyError(400, message, param=param) from None
    except msgspec.DecodeError as exc:
        raise ProxyError(400, f"Invalid JSON body: {exc}") from None
    except UnicodeDecodeError:
        raise ProxyError(400, "The request body is not valid UTF-8.") from None
    except RecursionError:  # ~1,000 levels: msgspec stops at Python's recursion limit
        raise _too_deep(limits) from None
    if not raw.isascii():  # msgspec skips unknown fields without checking their UTF-8; adapters decode them
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError(400, "The request body is not valid UTF-8.") from None
    if kind == "chat" and not fields.messages:
        raise ProxyError(400, "`messages` must contain at least one message.", param="messages")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(fields, name, None)
        if value is not None and value < 1:
            raise ProxyError(400, f"`{name}` must be at least 1, got {value}.", param=name)
        if value is not None and value > limits.max_tokens:
            raise ProxyError(400, f"`{name}` must be at most {limits.max_tokens}, got {value}.", param=name)
    if fields.priority is not None and not -(2**63) <= fields.priority < 2**63:  # msgspec takes uint64 too
        raise ProxyError(400, f"`priority` must be a 64-bit signed integer, got {fields.priority}.", param="priority")
    if fields.n < 1:
        raise ProxyError(400, f"`n` must be at least 1, got {fields.n}.", param="n")
    if fields.n > limits.max_n:
        raise ProxyError(400, f"`n` must be at most {limits.max_n}, got {fields.n}.", param="n")
    prompt = fields.messages if kind == "chat" else fields.prompt
    if nesting_exceeds(raw, limits.max_json_depth, chat_siblings(prompt) if kind == "chat" else 0):
        raise _too_deep(limits)
    # A body no larger than the limit cannot hold a longer prompt: measured only past it, O(messages).
    if len(raw) > limits.max_prompt_chars and (size := prompt_chars(prompt)) > limits.max_prompt_chars:
        param = "messages" if kind == "chat" else "prompt"
        message = f"The prompt has {size} characters; the limit is {limits.max_prompt_chars}."
        raise ProxyError(400, message, param=param)
    options = fields.stream_options
    limit = getattr(fields, "max_completion_tokens", None) or fields.max_tokens
    return ProxyRequest(
        id=new_request_id(),  # internal and unique: the client's X-Request-Id is kept apart
        client_request_id=request_id,
        kind=kind,
        model=fields.model,
        stream=fields.stream,
        include_usage=bool(options and options.include_usage),
        raw=raw,
        prompt=prompt,
        max_tokens=limit,
        temperature=fields.temperature,
        ignore_eos=fields.ignore_eos,
        stream_options_given=options is not None,
        priority_given=fields.priority is not None,
        priority=fields.priority or 0,
        est_prompt_tokens=len(raw) // 4,  # ~4 bytes per token; the engine's usage corrects it later
        est_output_tokens=min(limit, DEFAULT_OUTPUT_TOKENS) if limit else DEFAULT_OUTPUT_TOKENS,
    )


def _too_deep(limits: Limits) -> ProxyError:
    return ProxyError(400, f"The request body nests arrays and objects more than {limits.max_json_depth} levels deep.")


PREFIX_BLOCK_CHARS = 256
PREFIX_BLOCKS = 8  # bounded work: only the first 2 KiB of a prompt is hashed


def prefix_hashes(body: dict[str, Any]) -> list[int]:
    """Chained CRC-32s of the prompt's leading 256-character blocks (stable across replicas)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        size = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            text = content if isinstance(content, str) else ""
            parts.append(f"{message.get('role', '') if isinstance(message, dict) else ''}:{text}\n")
            size += len(parts[-1])
            if size >= PREFIX_BLOCK_CHARS * PREFIX_BLOCKS:
                break
        text = "".join(parts)
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else ""
    text = text[: PREFIX_BLOCK_CHARS * PREFIX_BLOCKS]
    hashes, chained = [], 0
    for start in range(0, len(text) - PREFIX_BLOCK_CHARS + 1, PREFIX_BLOCK_CHARS):
        chained = zlib.crc32(text[start : start + PREFIX_BLOCK_CHARS].encode("utf-8", "replace"), chained)
        hashes.append(chained)
    return hashes
