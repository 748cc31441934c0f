"""The OpenAI-compatible routes every engine serves, parameterised by each engine's dialect.

vLLM, SGLang and TGI all expose ``/v1/chat/completions`` and ``/v1/completions`` but differ
in small, client-visible ways (ids, error bodies, SSE framing, where ``finish_reason``
lands, whether usage is sent by default). :class:`Dialect` names those differences; the
handlers below implement the common flow once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from .http_common import ApiError, decode_body, encode, instance_of, json_response, start_sse, unix_now
from .instance import Generation, Instance
from .tokens import render_chat


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _GenerationFields(msgspec.Struct, kw_only=True):
    """Fields both OpenAI routes accept (engines' extras included)."""

    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    rid: str | None = None
    request_id: str | None = None


class ChatRequest(_GenerationFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_GenerationFields, kw_only=True):
    prompt: str | list[int | str]


@dataclass(frozen=True)
class Dialect:
    """How one engine's OpenAI routes differ from the others."""

    name: str
    error: Callable[[int, str, str, str | None], Any]  # (status, message, type, param) -> body
    sse_prefix: bytes = b"data: "
    usage_by_default: bool = False  # usage chunk sent without stream_options.include_usage
    empty_stream_options_enable_usage: bool = False  # vLLM: "stream_options": {} turns usage on
    role_on_every_chunk: bool = False  # TGI
    separate_finish_chunk: bool = False  # SGLang: finish_reason in a chunk of its own
    chat_id_prefix: str = "chatcmpl-"
    completion_id_prefix: str = "cmpl-"
    empty_chat_id: bool = False  # TGI sends "id": ""
    echo_model: bool = True  # False: reply with the served model id (TGI)
    extra_chunk_fields: Callable[[Instance], dict[str, Any]] | None = None
    extra_choice_fields: dict[str, Any] | None = None
    stream_error: Callable[[int, str], Any] | None = None  # body of an error sent inside a stream
    check_priority: bool = False  # vLLM: non-zero priority needs --scheduling-policy priority
    finish_reason_map: dict[str, str] | None = None
    context_error_status: int = 400
    # (prompt tokens, requested max tokens or None, context limit) -> message; None: vLLM's wording
    context_error_message: Callable[[int, int | None, int], str] | None = None

    def bad_request(self, message: str, param: str | None = None, status: int = 400) -> ApiError:
        return ApiError(status, self.error(status, message, "BadRequestError", param))


def _served_model(instance: Instance, dialect: Dialect, requested: str | None) -> str:
    served = instance.config.model
    if requested is None or requested == served or requested in instance.lora_adapters:
        return requested or served
    if dialect.name == "tgi":
        return requested  # TGI takes any other model name as a LoRA adapter id
    raise ApiError(404, dialect.error(404, f"The model `{requested}` does not exist.", "NotFoundError", None))


def _max_tokens(instance: Instance, dialect: Dialect, prompt_tokens: int, requested: int | None) -> int:
    limit = instance.max_model_len
    custom = dialect.context_error_message
    too_long = prompt_tokens >= limit or (requested is not None and prompt_tokens + requested > limit)
    if custom is not None and too_long:
        raise dialect.bad_request(custom(prompt_tokens, requested, limit), status=dialect.context_error_status)
    if prompt_tokens >= limit:
        raise dialect.bad_request(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            status=dialect.context_error_status,
        )
    if requested is None:
        return limit - prompt_tokens
    if requested < 1:
        raise dialect.bad_request(f"max_tokens must be at least 1, got {requested}.", "max_tokens")
    if prompt_tokens + requested > limit:
        raise dialect.bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's maximum "
            f"context length is {limit} tokens and your request has {prompt_tokens} input tokens "
            f"({requested} > {limit} - {prompt_tokens}).",
            "max_tokens",
            status=dialect.context_error_status,
        )
    return requested


def _check_common(instance: Instance, dialect: Dialect, n: int, priority: int) -> None:
    if n != 1:
        raise dialect.bad_request("The emulator serves n=1 only.", "n")
    if dialect.check_priority and priority != 0 and not instance.engine.priority_scheduling:
        raise dialect.bad_request(f"Got priority {priority} but Priority scheduling is not enabled.", "priority")
    queued_limit = instance.config.max_queued_requests
    if queued_limit is not None and len(instance.engine.waiting) >= queued_limit:
        message = "The request queue is full." if dialect.name == "sglang" else "Too many queued requests."
        raise ApiError(503, dialect.error(503, message, "ServiceUnavailableError", None))
    if dialect.name == "tgi" and instance.engine.num_in_flight >= instance.config.max_concurrent_requests:
        raise ApiError(429, {"error": "Model is overloaded", "error_type": "overloaded"})


def _include_usage(dialect: Dialect, options: dict[str, Any] | None) -> bool:
    if options is None:
        return dialect.usage_by_default
    if "include_usage" in options:
        return bool(options["include_usage"])
    return dialect.empty_stream_options_enable_usage or dialect.usage_by_default


def _finish(dialect: Dialect, reason: str | None) -> str | None:
    if reason is None:
        return None
    return (dialect.finish_reason_map or {}).get(reason, reason)


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.seq.output
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


async def chat_completions(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    instance = instance_of(request)
    body = await decode_body(request, ChatRequest, lambda m: dialect.bad_request(m, status=_decode_status(dialect)))
    model = _served_model(instance, dialect, body.model)
    _check_common(instance, dialect, body.n, body.priority)
    prompt = render_chat([msgspec.structs.asdict(m) for m in body.messages])
    prompt_tokens = instance.count_tokens_of(prompt)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new = _max_tokens(instance, dialect, prompt_tokens, requested)
    rid = _request_id(request, body.rid or body.request_id)
    generation = instance.submit(
        prompt, max_new, rid=rid, ignore_eos=body.ignore_eos, priority=body.priority, min_tokens=body.min_tokens
    )
    reply_id = "" if dialect.empty_chat_id else f"{dialect.chat_id_prefix}{rid}"
    return await _respond(
        request,
        dialect,
        instance,
        generation,
        reply_id,
        model,
        chat=True,
        stream=body.stream,
        stream_options=body.stream_options,
    )


async def completions(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    instance = instance_of(request)
    body = await decode_body(
        request, CompletionRequest, lambda m: dialect.bad_request(m, status=_decode_status(dialect))
    )
    model = _served_model(instance, dialect, body.model)
    _check_common(instance, dialect, body.n, body.priority)
    prompt_ids: list[int] | None = None
    if isinstance(body.prompt, str):
        prompt = body.prompt
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
        prompt_ids = [int(p) for p in body.prompt]
        prompt = ""
    elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        prompt = body.prompt[0]
    else:
        raise dialect.bad_request("The emulator serves one prompt (a string or token ids) per request.", "prompt")
    prompt_tokens = len(prompt_ids) if prompt_ids is not None else instance.count_tokens_of(prompt)
    max_new = _max_tokens(instance, dialect, prompt_tokens, 16 if body.max_tokens is None else body.max_tokens)
    rid = _request_id(request, body.rid or body.request_id)
    generation = instance.submit(
        prompt,
        max_new,
        rid=rid,
        ignore_eos=body.ignore_eos,
        priority=body.priority,
        min_tokens=body.min_tokens,
        prompt_ids=prompt_ids,
    )
    reply_id = f"{dialect.completion_id_prefix}{rid}"
    return await _respond(
        request,
        dialect,
        instance,
        generation,
        reply_id,
        model,
        chat=False,
        stream=body.stream,
        stream_options=body.stream_options,
    )


async def _respond(
    request: web.Request,
    dialect: Dialect,
    instance: Instance,
    generation: Generation,
    reply_id: str,
    model: str,
    *,
    chat: bool,
    stream: bool,
    stream_options: dict[str, Any] | None,
) -> web.StreamResponse:
    """Stream or return the reply in the dialect's shape; an unfinished generation is aborted."""
    reply_model = model if dialect.echo_model else instance.config.model
    try:
        if stream:
            return await _stream(
                request,
                dialect,
                instance,
                generation,
                reply_id,
                reply_model,
                chat=chat,
                usage=_include_usage(dialect, stream_options),
            )
        await _wait(generation)
        text = "".join(generation.piece(i) for i in range(generation.seq.output))
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choice = {
            "index": 0,
            **content,
            "logprobs": None,
            "finish_reason": _finish(dialect, generation.seq.finish_reason),
            **_choice_extra(dialect),
        }
        reply = {
            "id": reply_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": unix_now(),
            "model": reply_model,
            "choices": [choice],
            "usage": _usage(generation),
        }
        if chat:
            reply.update(_chunk_extra(dialect, instance))
        return json_response(reply)
    finally:
        instance.release(generation)


def _decode_status(dialect: Dialect) -> int:
    return 422 if dialect.name == "tgi" else 400


def _request_id(request: web.Request, explicit: str | None) -> str:
    return explicit or request.headers.get("X-Request-Id") or uuid.uuid4().hex


def _chunk_extra(dialect: Dialect, instance: Instance) -> dict[str, Any]:
    return dialect.extra_chunk_fields(instance) if dialect.extra_chunk_fields else {}


def _choice_extra(dialect: Dialect) -> dict[str, Any]:
    return dict(dialect.extra_choice_fields or {})


async def _wait(generation: Generation) -> None:
    async for _ in generation.updates():
        pass


async def _stream(
    request: web.Request,
    dialect: Dialect,
    instance: Instance,
    generation: Generation,
    reply_id: str,
    model: str,
    *,
    chat: bool,
    usage: bool,
) -> web.StreamResponse:
    response = await start_sse(request)
    prefix = dialect.sse_prefix
    created = unix_now()
    head = {
        "id": reply_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        **_chunk_extra(dialect, instance),
    }
    if dialect.name == "tgi":  # serde's tag="object" puts "object" first
        head = {"object": head.pop("object"), **head}
    choice_extra = _choice_extra(dialect)

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return prefix + encode({**head, "choices": choices, **extra}) + b"\n\n"

    def choice(text: str, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if first or dialect.role_on_every_chunk:
                delta = {"role": "assistant", "content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **choice_extra}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **choice_extra}

    sent = 0
    # vLLM and SGLang send the role chunk on their first engine output (with the first token, after
    # prefill), not on acceptance: a proxy must not read "accepted" as "first byte".
    role_pending = chat and not dialect.role_on_every_chunk
    seq = generation.seq
    async for produced in generation.updates():
        if seq.finish_reason == "abort":
            break
        frames: list[bytes] = []
        if role_pending and (produced > sent or seq.finished):
            frames.append(frame([choice("", None, first=True)]))
            role_pending = False
        for index in range(sent, produced):
            last = seq.finished and index == produced - 1
            finish = _finish(dialect, seq.finish_reason) if last and not dialect.separate_finish_chunk else None
            frames.append(frame([choice(generation.piece(index), finish)]))
        sent = produced
        if seq.finished and dialect.separate_finish_chunk:
            frames.append(frame([choice("", _finish(dialect, seq.finish_reason))]))
        if frames:
            await response.write(b"".join(frames))
    if usage:
        await response.write(frame([], usage=_usage(generation)))
    await response.write(prefix + b"[DONE]\n\n")
    await response.write_eof()
    return response


async def models_list(instance: Instance, entry: Callable[[str, str | None], dict[str, Any]]) -> web.Response:
    data = [entry(instance.config.model, None)]
    data += [entry(name, instance.config.model) for name in instance.lora_adapters]
    return json_response({"object": "list", "data": data})


def add_routes(app: web.Application, dialect: Dialect) -> None:
    """Register ``/v1/chat/completions`` and ``/v1/completions`` in ``dialect``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        return await chat_completions(request, dialect)

    async def text(request: web.Request) -> web.StreamResponse:
        return await completions(request, dialect)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", text)
