"""TGI adapter: its OpenAI routes, normalised to what OpenAI clients expect.

TGI takes any ``model`` other than ``"tgi"`` as a LoRA adapter id, answers with ``"id": ""``
and its own model id, repeats ``role`` in every chunk, frames SSE as ``data: {…}`` (``data:{…}``
before 2.1: the SSE decoder takes both), says ``eos_token`` / ``stop_sequence`` / ``""`` where OpenAI
says ``stop`` / null, and reports errors as ``{"error": "...", "error_type": "..."}`` (422 for
validation), or, inside its OpenAI streams, as ``{"error": {"message", "http_status_code": 422}}``
after HTTP 200 whatever went wrong. The translator rewrites each chunk; errors map to OpenAI statuses
by type or message (overloaded -> 429, retried elsewhere before the first byte; validation -> 400).
"""

from __future__ import annotations

from typing import Any

import msgspec

from sloproxy.context import ContextWindow, LengthRule
from sloproxy.errors import ProxyError
from sloproxy.request import ProxyRequest

from .base import (
    DONE_FRAME,
    BackendLoad,
    EngineAdapter,
    Metrics,
    StreamTranslator,
    UpstreamCall,
    Usage,
    as_int,
    decode_json,
    openai_route,
    record_usage,
)
from .openai_compat import clamp_reply_limit

_STATUS = {422: 400, 424: 500, 413: 413}
# TGI's error types (router/src/infer/mod.rs) -> the status an OpenAI client expects. Overloaded is 429:
# the engine is full, so the forwarder retries elsewhere before the first byte.
_TYPE_STATUS = {
    "overloaded": 429,
    "validation": 400,
    "template_error": 400,
    "missing_template_variable": 400,
    "tool_error": 400,
    "generation": 500,
    "incomplete_generation": 500,
    "incomplete_generation_stream": 500,
    "stream_serialization_error": 500,
}
# The messages InferError displays, by type (the in-stream event carries only the message).
_MESSAGE_TYPES = (
    ("Model is overloaded", "overloaded"),
    ("Input validation error", "validation"),
    ("Template error", "template_error"),
    ("Missing template vatiable", "missing_template_variable"),  # sic, as TGI spells it
    ("Tool error", "tool_error"),
    ("Request failed during generation", "generation"),
    ("Incomplete generation", "incomplete_generation"),
    ("Stream event serialization error", "stream_serialization_error"),
)
# Request fields TGI's validation messages name (`inputs` is the prompt).
_PARAMS = (
    ("`max_new_tokens`", "max_tokens"),
    ("`inputs`", "messages"),
    ("`temperature`", "temperature"),
    ("`top_p`", "top_p"),
    ("`frequency_penalty`", "frequency_penalty"),
    ("`repetition_penalty`", "presence_penalty"),
    ("`stop`", "stop"),
    ("`top_n_tokens`", "top_logprobs"),
)


def _error_type(message: str) -> str | None:
    return next((kind for prefix, kind in _MESSAGE_TYPES if message.startswith(prefix)), None)


def _param_of(message: str) -> str | None:
    """The request field a validation message is about (the first one it names)."""
    found = [(message.find(word), param) for word, param in _PARAMS if word in message]
    return min(found)[1] if found else None


# TGI's finish reasons -> OpenAI's: its completions streams say eos_token, and both routes say
# stop_sequence where OpenAI says stop; "" (its non-final completions chunks) is null.
_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "": None}


def _finish_reasons(choices: list[Any]) -> None:
    for choice in choices:
        if isinstance(choice, dict) and choice.get("finish_reason") in _FINISH:
            choice["finish_reason"] = _FINISH[choice["finish_reason"]]


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
        _finish_reasons(choices)
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
    # Refuses prompt + min(max_tokens, 1024) over max_total_tokens and a prompt over max_input_tokens;
    # a longer reply runs in rounds of 1,024 and ends with `length` at the window (tests/test_contract_tgi.py).
    length_rule = LengthRule("refuse", checked_reply=1024)
    context_path = "/info"

    def parse_context(self, body: bytes, models: frozenset[str]) -> ContextWindow | None:
        info = decode_json(body)
        if not isinstance(info, dict):
            return None
        total, prompt = info.get("max_total_tokens"), info.get("max_input_tokens")
        if not isinstance(total, int) or total < 2:
            return None
        return ContextWindow(total, prompt if isinstance(prompt, int) and prompt > 0 else None)

    def __init__(self, api_key: str | None = None, priority_scheduling: bool = False) -> None:
        self.headers = {"Content-Type": "application/json"}  # TGI has no priorities: hints are dropped

    def build(self, request: ProxyRequest) -> UpstreamCall:
        body = dict(request.decoded_body())
        body.pop("priority", None)
        body["model"] = "tgi"  # any other name would be taken as a LoRA adapter id
        if request.clamped_to is not None:
            clamp_reply_limit(body, request.clamped_to)
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
        if isinstance(reply.get("choices"), list):
            _finish_reasons(reply["choices"])
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
        """An OpenAI error for TGI's ``{"error", "error_type"}`` body, or for the event its OpenAI
        streams send for every inference error, ``{"error": {"message", "http_status_code": 422}}``:
        422 whatever went wrong, so the kind is read from the message (TGI's InferError wording)."""
        if isinstance(error, dict):
            status = int(error.get("http_status_code", status) or status)
            error = error.get("message")
            if error_type is None and isinstance(error, str):
                error_type = _error_type(error)
        message = error if isinstance(error, str) else f"The backend failed with HTTP {status}."
        mapped = _TYPE_STATUS.get(error_type) if isinstance(error_type, str) else None
        if mapped is not None:
            status = mapped
        param = _param_of(message) if status in (400, 422) else None
        return ProxyError(_STATUS.get(status, status), message, param=param)

    def parse_load(self, metrics_text: str) -> BackendLoad | None:
        metrics = Metrics(metrics_text)
        running, waiting = metrics.total("tgi_batch_current_size"), metrics.total("tgi_queue_size")
        if running is None or waiting is None:
            return None
        capacity = metrics.total("tgi_batch_max_total_tokens")
        held = metrics.total("tgi_batch_current_max_tokens")
        return BackendLoad(
            running=int(running),
            waiting=int(waiting),
            kv_usage=held / capacity if capacity and held is not None else None,
            kv_capacity_tokens=as_int(capacity),
        )
