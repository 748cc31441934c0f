"""TGI adapter: its OpenAI routes, normalised to what OpenAI clients expect.

TGI takes any ``model`` other than ``"tgi"`` as a LoRA adapter id, answers with ``"id": ""``
and its own model id, repeats ``role`` in every chunk, frames SSE as ``data:{…}``, and
reports errors as ``{"error": "...", "error_type": "..."}`` (422 for validation). The
translator rewrites each chunk; errors map to OpenAI statuses (422 -> 400).
"""

from __future__ import annotations

from typing import Any

import msgspec

from sloproxy.errors import ProxyError
from sloproxy.request import ProxyRequest

from .base import (
    DONE_FRAME,
    BackendLoad,
    EngineAdapter,
    StreamTranslator,
    UpstreamCall,
    Usage,
    decode_json,
    metric_values,
    openai_route,
    record_usage,
)

_STATUS = {422: 400, 424: 500, 413: 413}
_encode = msgspec.json.encode


def _reply_id(request: ProxyRequest) -> str:
    return f"{'chatcmpl' if request.kind == 'chat' else 'cmpl'}-{request.id}"


def _usage(value: Any) -> Usage | None:
    if isinstance(value, dict):
        return Usage(int(value.get("prompt_tokens", 0)), int(value.get("completion_tokens", 0)))
    return None


class TGIStream(StreamTranslator):
    """Rewrites each TGI chunk into the shape vLLM and OpenAI send, role-first chunk included."""

    def __init__(self, request: ProxyRequest) -> None:
        super().__init__(request)
        self._role_sent = request.kind != "chat"
        self._id = _reply_id(request)

    def feed(self, payload: bytes) -> bytes:
        if payload == b"[DONE]":
            self.done = True
            return DONE_FRAME
        chunk = decode_json(payload)
        if not isinstance(chunk, dict):
            return self.error(502, "The backend sent a stream event that is not valid JSON.")
        if "error" in chunk:
            error = TGIAdapter.error_from(chunk.get("error"), chunk.get("error_type"), 500)
            return self.error(error.status, error.message)
        choices = chunk.get("choices") or []
        head = {
            "id": self._id,
            "object": chunk.get("object"),
            "created": chunk.get("created"),
            "model": self.request.model,
        }
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            record_usage(self.request, usage)
            if not choices:
                if not self.request.include_usage:
                    return b""
                total = usage.prompt_tokens + usage.completion_tokens
                return _frame(
                    {**head, "choices": [], "usage": {**msgspec.structs.asdict(usage), "total_tokens": total}}
                )
        out = b""
        if not self._role_sent and choices:
            self._role_sent = True
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            out = _frame({**head, "choices": [role]})
        if self.request.kind == "chat":
            for choice in choices:
                if isinstance(choice.get("delta"), dict):
                    choice["delta"].pop("role", None)
        frame = {**head, "choices": choices}
        if usage is not None and self.request.include_usage:
            total = usage.prompt_tokens + usage.completion_tokens
            frame["usage"] = {**msgspec.structs.asdict(usage), "total_tokens": total}
        return out + _frame(frame)


def _frame(chunk: dict[str, Any]) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


class TGIAdapter(EngineAdapter):
    engine = "tgi"

    def __init__(self, api_key: str | None = None, priority_scheduling: bool = False) -> None:
        self.headers = {"Content-Type": "application/json"}  # TGI has no priorities: hints are dropped

    def build(self, request: ProxyRequest) -> UpstreamCall:
        body = dict(request.decoded_body())
        body.pop("priority", None)
        body["model"] = "tgi"  # any other name would be taken as a LoRA adapter id
        if request.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return UpstreamCall(openai_route(request), _encode(body), self.headers)

    def stream_translator(self, request: ProxyRequest) -> StreamTranslator:
        return TGIStream(request)

    def translate_reply(self, request: ProxyRequest, body: bytes) -> bytes:
        reply = decode_json(body)
        if not isinstance(reply, dict):
            raise ProxyError(502, "The backend returned a reply that is not valid JSON.")
        usage = _usage(reply.get("usage"))
        record_usage(request, usage)
        reply.pop("system_fingerprint", None)
        reply["id"] = _reply_id(request)
        reply["model"] = request.model
        return _encode(reply)

    def translate_error(self, status: int, body: bytes) -> ProxyError:
        parsed = decode_json(body)
        if isinstance(parsed, dict):
            return self.error_from(parsed.get("error"), parsed.get("error_type"), status)
        return ProxyError(_STATUS.get(status, status), f"The backend failed with HTTP {status}.")

    @staticmethod
    def error_from(error: Any, error_type: Any, status: int) -> ProxyError:
        if isinstance(error, dict):  # OpenAI-route stream error: {"message", "http_status_code"}
            status = int(error.get("http_status_code", status) or status)
            error = error.get("message")
        message = error if isinstance(error, str) else f"The backend failed with HTTP {status}."
        if error_type == "overloaded":
            status = 429
        elif error_type == "validation":
            status = 400
        return ProxyError(_STATUS.get(status, status), message)

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
