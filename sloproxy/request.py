"""The one request object: everything the proxy knows about a request lives here.

Parsed once at the edge: the JSON body is decoded to a dict (unknown fields are kept and
passed through to engines that accept them) and validated against the few fields the proxy
itself relies on, with errors that name the field.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from .errors import ProxyError

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


class _CompletionFields(msgspec.Struct):
    model: str
    prompt: str | list[Any]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    n: int = 1


@dataclass(slots=True, eq=False)
class ProxyRequest:
    id: str
    kind: Kind
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    body: dict[str, Any]
    raw: bytes
    received_at: float = field(default_factory=time.monotonic)
    prompt_tokens: int | None = None  # learned from the engine's usage
    completion_tokens: int | None = None
    backend: str | None = None
    attempts: int = 0
    disconnected: bool = False  # the client went away before its reply ended


def _validation_message(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    text = str(exc)
    param = None
    if "`$." in text:
        param = text.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0].split(".", 1)[0]
    return text, param


def parse_request(kind: Kind, raw: bytes, request_id: str | None = None) -> ProxyRequest:
    """Decode and validate a client body; raises :class:`ProxyError` (400) on bad input."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProxyError(400, f"Invalid JSON body: {exc}") from None
    except UnicodeDecodeError:
        raise ProxyError(400, "The request body is not valid UTF-8.") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "The request body must be a JSON object.")
    try:
        fields = msgspec.convert(body, _ChatFields if kind == "chat" else _CompletionFields)
    except msgspec.ValidationError as exc:
        message, param = _validation_message(exc)
        raise ProxyError(400, message, param=param) from None
    if kind == "chat" and not fields.messages:
        raise ProxyError(400, "`messages` must contain at least one message.", param="messages")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(fields, name, None)
        if value is not None and value < 1:
            raise ProxyError(400, f"`{name}` must be at least 1, got {value}.", param=name)
    if fields.n < 1:
        raise ProxyError(400, f"`n` must be at least 1, got {fields.n}.", param="n")
    options = fields.stream_options
    return ProxyRequest(
        id=request_id or new_request_id(),
        kind=kind,
        model=fields.model,
        stream=fields.stream,
        include_usage=bool(options and options.include_usage),
        body=body,
        raw=raw,
    )
