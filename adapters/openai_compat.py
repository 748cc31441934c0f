"""Shared by engines whose OpenAI routes already speak OpenAI (vLLM, SGLang, OpenAI itself).

Bodies and stream frames pass through byte for byte; the proxy only asks for the usage chunk
(so it always learns true token counts) and drops it again when the client did not ask.
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec

from sloproxy.context import ContextWindow
from sloproxy.errors import ProxyError
from sloproxy.request import ProxyRequest

from .base import (
    DONE_FRAME,
    BackendLoad,
    EngineAdapter,
    StreamTranslator,
    UpstreamCall,
    Usage,
    _UsageOnly,
    decode_json,
    openai_route,
    record_usage,
)

_usage_decoder = msgspec.json.Decoder(_UsageOnly)


class _UsageChunk(msgspec.Struct):
    choices: list[object] | None = None
    usage: Usage | None = None


_usage_chunk_decoder = msgspec.json.Decoder(_UsageChunk)


class _AnyObject(msgspec.Struct):
    """Any JSON object (fields skipped, syntax still checked)."""


_object_decoder = msgspec.json.Decoder(_AnyObject)


_LOOKED_AT = (b'"usage"', b"[DONE]", b'"error"')  # events holding one of these are parsed, not passed


def clamp_reply_limit(body: dict, limit: int) -> None:
    """Cut the body's reply limit to ``limit`` (both OpenAI names where the client used them)."""
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        body["max_completion_tokens"] = limit
        if body.get("max_tokens") is not None:
            body["max_tokens"] = limit
    else:
        body["max_tokens"] = limit


def window_from_models(body: bytes, models: frozenset[str], field: str) -> ContextWindow | None:
    """The window in ``/v1/models``: the ``field`` of the first card naming one of ``models`` (or of the
    first card at all, an engine serving one model under another name)."""
    listing = decode_json(body)
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list):
        return None
    cards = [c for c in cards if isinstance(c, dict)]
    chosen = next((c for c in cards if c.get("id") in models), cards[0] if cards else None)
    length = chosen.get(field) if chosen is not None else None
    return ContextWindow(length) if isinstance(length, int) and length > 1 else None


_PARAMETER_SUFFIX = re.compile(r"\(parameter=(\w+)")  # vLLM's validation messages end with it


def _client_param(param: object, message: str) -> str | None:
    """The request field an engine's error is about, as the client named it: vLLM says ``body.messages``
    for a schema error and ``input_tokens`` for a prompt over the window; SGLang never fills it."""
    if isinstance(param, str) and param:
        if param.startswith("body."):
            param = param[5:].split(".", 1)[0].split("[", 1)[0]
        return "messages" if param in ("input_tokens", "prompt_tokens") else param
    found = _PARAMETER_SUFFIX.search(message)
    if found is not None:
        return found.group(1)
    if message.startswith("Messages cannot be empty"):
        return "messages"
    return None


class PassThroughStream(StreamTranslator):
    checked = False  # the first event was parsed

    def unchanged(self, events: bytes) -> bool:
        """Token chunks pass as they are; only usage, errors and the end need a look (C-speed scans).
        The first event is always parsed: a backend that answers 200 with something other than an
        OpenAI stream then fails before the client sees a byte, and the request can go elsewhere."""
        return bool(events) and self.unchanged_until(events) == len(events)

    def unchanged_until(self, events: bytes, start: int = 0) -> int:
        """Events up to the first one that mentions usage, ``[DONE]`` or an error pass as they are."""
        if not self.checked or not events.startswith(b"data: ", start):
            return start
        end = cut = len(events)
        for marker in _LOOKED_AT:
            found = events.find(marker, start, cut)
            if found >= 0:
                cut = found
        if cut == end:
            return end
        boundary = events.rfind(b"\n\n", start, cut)
        return start if boundary < 0 else boundary + 2

    def feed(self, payload: bytes) -> bytes:
        if payload == b"[DONE]":
            self.done = True
            return DONE_FRAME
        if payload.startswith(b'{"error"') or payload.startswith(b'{"object":"error"'):
            error = OpenAICompatibleAdapter.error_from(500, payload)
            return self.error(error.status, error.message)
        if not self.checked:
            _object_decoder.decode(payload)  # raises on garbage: the forwarder answers 502 or retries
            self.checked = True
        if b'"usage"' in payload:
            chunk = _usage_chunk_decoder.decode(payload)
            if chunk.usage is not None:
                record_usage(self.request, chunk.usage)
                if not chunk.choices and not self.request.include_usage:
                    return b""  # the usage chunk the proxy asked for, not the client
        return b"data: " + payload + b"\n\n"


class OpenAICompatibleAdapter(EngineAdapter):
    engine = "openai"
    health_path = "/v1/models"
    metrics_path = None
    extra_fields: ClassVar[tuple[str, ...]] = ()
    # A request header the engine takes the priority from over the body's (None: the body carries it):
    # the body then passes as the client sent it, with no re-encoding of the prompt.
    priority_header: ClassVar[str | None] = None

    def __init__(self, api_key: str | None = None, priority_scheduling: bool = False) -> None:
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.priority_scheduling = priority_scheduling

    def engine_priority(self, request: ProxyRequest) -> int | None:
        """The engine's ``priority`` value for this request; None: send none (strip the client's)."""
        return None

    def body_for(self, request: ProxyRequest) -> bytes:
        """The raw client body, or a changed one: asked for usage, priority hint set or stripped."""
        priority = None if self.priority_header is not None else self.engine_priority(request)
        needs_usage = request.stream and not request.include_usage
        touches_priority = priority is not None or (request.priority_given and not self.priority_scheduling)
        clamped = request.clamped_to
        if not needs_usage and not touches_priority and clamped is None:
            return request.raw
        raw = request.raw.lstrip()
        if not touches_priority and clamped is None and not request.stream_options_given and raw.startswith(b"{"):
            return b'{"stream_options":{"include_usage":true},' + raw[1:]  # no re-encode of the prompt
        body = dict(request.decoded_body())
        if clamped is not None:
            clamp_reply_limit(body, clamped)
        if needs_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if priority is not None:
            body["priority"] = priority
        elif not self.priority_scheduling:
            body.pop("priority", None)
        return msgspec.json.encode(body)

    def build(self, request: ProxyRequest) -> UpstreamCall:
        headers = {**self.headers, "X-Request-Id": request.id}
        if self.priority_header is not None and (priority := self.engine_priority(request)) is not None:
            headers[self.priority_header] = str(priority)
        return UpstreamCall(openai_route(request), self.body_for(request), headers)

    def stream_translator(self, request: ProxyRequest) -> StreamTranslator:
        return PassThroughStream(request)

    def translate_reply(self, request: ProxyRequest, body: bytes) -> bytes:
        try:
            record_usage(request, _usage_decoder.decode(body).usage)
        except msgspec.DecodeError:
            raise ProxyError(502, "The backend returned a reply that is not valid JSON.") from None
        return body

    def translate_error(self, status: int, body: bytes) -> ProxyError:
        return self.error_from(status, body)

    @staticmethod
    def error_from(status: int, body: bytes) -> ProxyError:
        """vLLM's nested ``{"error": {...}}`` and older flat ``{"object": "error", ...}`` bodies."""
        parsed = decode_json(body)
        message, param, code = None, None, None
        if isinstance(parsed, dict):
            inner = parsed.get("error") if isinstance(parsed.get("error"), dict) else parsed
            message = inner.get("message")
            param = inner.get("param")
            code = inner.get("code")
            if isinstance(code, int):  # engines put the HTTP status there; OpenAI uses a string code
                if 400 <= code < 600 and status == 500:
                    status = code
                code = None
        if not isinstance(message, str):
            message = f"The backend failed with HTTP {status}."
        return ProxyError(status, message, param=_client_param(param, message), code=code)

    def parse_load(self, metrics_text: str) -> BackendLoad | None:
        return None  # a hosted endpoint reports no load (and is never polled: no metrics_path)
