"""The OpenAI-compatible routes every engine serves, parameterised by each engine's dialect.

vLLM, SGLang and TGI all expose ``/v1/chat/completions`` and ``/v1/completions`` but differ
in client-visible ways: which requests they accept and what they clamp (each engine's
``admit`` function), error bodies, SSE framing, where ``finish_reason`` lands, when usage is
sent, and which errors arrive as an HTTP status and which inside a stream after HTTP 200.
:class:`Dialect` names those differences; the handlers below implement the common flow once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from .http_common import (
    ApiError,
    DecodeProblem,
    decode_request,
    encode,
    instance_of,
    json_response,
    start_sse,
    unix_now,
)
from .instance import Generation, Instance
from .tokens import render_chat


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _GenerationFields(msgspec.Struct, kw_only=True):
    """Fields both OpenAI routes accept (engines' extras included)."""

    model: str | None = None
    # UNSET (absent) and None (explicit null) differ for completions in SGLang (16 vs no limit).
    max_tokens: int | msgspec.UnsetType | None = msgspec.UNSET
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int | None = None
    rid: str | None = None
    request_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None


class ChatRequest(_GenerationFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_GenerationFields, kw_only=True):
    prompt: str | list[int | str]
    suffix: str | None = None


@dataclass(slots=True)
class Call:
    """One request on an OpenAI route, decoded and tokenized, before the engine's own checks."""

    request: web.Request
    instance: Instance
    body: ChatRequest | CompletionRequest
    chat: bool
    prompt: str
    prompt_ids: list[int] | None  # token-id prompts (completions)
    prompt_tokens: int

    @property
    def max_tokens(self) -> int | None:
        """``max_tokens`` as sent; None when absent or null."""
        value = self.body.max_tokens
        return None if value is msgspec.UNSET else value  # type: ignore[return-value]

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)


@dataclass(slots=True)
class Admission:
    """What the engine accepted: the model name its replies carry, and how it schedules the request."""

    model: str
    max_new: int
    priority: int = 0
    rid: str | None = None


@dataclass(frozen=True)
class Dialect:
    """How one engine's OpenAI routes differ from the others."""

    name: str
    error: Callable[[int, str, str, str | None], Any]  # (status, message, type, param) -> body
    admit: Callable[[Call], Admission]  # the engine's checks, in its order; raises ApiError
    decode_error: Callable[[DecodeProblem], ApiError]
    # (call) -> (usage chunk at the end, usage on every chunk)
    usage: Callable[[Call], tuple[bool, bool]] = lambda call: (False, False)
    sse_prefix: bytes = b"data: "
    role_on_every_chunk: bool = False  # TGI
    separate_finish_chunk: bool = False  # SGLang: finish_reason in a chunk of its own
    reasoning_content_delta: bool = False  # SGLang: every chat delta carries "reasoning_content"
    usage_null_on_chunks: bool = False  # TGI chat: "usage": null on every ordinary chunk
    completion_final_usage: bool = False  # TGI completions: usage in the final chunk, always
    completion_running_finish: str | None = None  # finish_reason of non-final completion chunks (TGI: "")
    completion_stream_finish_map: dict[str, str] | None = None  # TGI: EOS is "eos_token" there
    chat_id_prefix: str = "chatcmpl-"
    completion_id_prefix: str = "cmpl-"
    empty_ids: bool = False  # TGI sends "id": ""
    headers_on_first_frame: bool = False  # SGLang sends HTTP 200 with the first chunk, not on acceptance
    finish_on_abort: bool = True  # an engine-side abort ends the stream with finish_reason "abort"
    stream_headers: dict[str, str] | None = None
    extra_chunk_fields: Callable[[Instance], dict[str, Any]] | None = None
    extra_choice_fields: dict[str, Any] | None = None
    reply_headers: Callable[[web.Request, Instance], dict[str, str] | None] | None = None  # vLLM ORCA
    # an engine abort with an HTTP status (Generation.error) -> the error to answer with (SGLang)
    abort_error: Callable[[int, str], ApiError] | None = None

    def bad_request(self, message: str, param: str | None = None, status: int = 400) -> ApiError:
        return ApiError(status, self.error(status, message, "BadRequestError", param))


def _call(request: web.Request, instance: Instance, body: ChatRequest | CompletionRequest, dialect: Dialect) -> Call:
    prompt_ids: list[int] | None = None
    if isinstance(body, ChatRequest):
        prompt = render_chat([msgspec.structs.asdict(m) for m in body.messages]) if body.messages else ""
    elif isinstance(body.prompt, str):
        prompt = body.prompt
    elif body.prompt and all(isinstance(p, int) for p in body.prompt):
        prompt_ids = [int(p) for p in body.prompt]
        prompt = ""
    elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        prompt = body.prompt[0]
    else:
        raise dialect.bad_request("The emulator serves one prompt (a string or token ids) per request.", "prompt")
    tokens = len(prompt_ids) if prompt_ids is not None else instance.count_tokens_of(prompt)
    return Call(request, instance, body, isinstance(body, ChatRequest), prompt, prompt_ids, tokens)


async def handle(request: web.Request, dialect: Dialect, *, chat: bool) -> web.StreamResponse:
    """``/v1/chat/completions`` (``chat``) or ``/v1/completions``."""
    instance = instance_of(request)
    body = await decode_request(request, ChatRequest if chat else CompletionRequest, dialect.decode_error)
    call = _call(request, instance, body, dialect)
    if body.n != 1:
        raise dialect.bad_request("The emulator serves n=1 only.", "n")
    try:
        admission = dialect.admit(call)
    except ApiError as error:
        if call.stream and error.stream_body is not None:
            return await _stream_refusal(call, dialect, error)
        raise
    rid = admission.rid or _request_id(request, body.rid or body.request_id)
    generation = instance.submit(
        call.prompt,
        admission.max_new,
        rid=rid,
        ignore_eos=body.ignore_eos,
        priority=admission.priority,
        min_tokens=body.min_tokens,
        prompt_ids=call.prompt_ids,
    )
    id_prefix = dialect.chat_id_prefix if chat else dialect.completion_id_prefix
    reply_id = "" if dialect.empty_ids else f"{id_prefix}{rid}"
    try:
        if call.stream:
            return await _stream(call, dialect, generation, reply_id, admission.model)
        return await _reply(call, dialect, generation, reply_id, admission.model)
    finally:
        instance.release(generation)


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.seq.output
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


async def _wait(generation: Generation) -> None:
    async for _ in generation.updates():
        pass


async def _reply(call: Call, dialect: Dialect, generation: Generation, reply_id: str, model: str) -> web.Response:
    instance = call.instance
    await _wait(generation)
    if generation.error is not None and dialect.abort_error is not None:
        raise dialect.abort_error(*generation.error)
    text = "".join(generation.piece(i) for i in range(generation.seq.output))
    content = {"message": {"role": "assistant", "content": text}} if call.chat else {"text": text}
    choice = {
        "index": 0,
        **content,
        "logprobs": None,
        "finish_reason": generation.seq.finish_reason,
        **(dialect.extra_choice_fields or {}),
    }
    reply = {
        "id": reply_id,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": unix_now(),
        "model": model,
        "choices": [choice],
        "usage": _usage(generation),
    }
    if call.chat and dialect.extra_chunk_fields:
        reply.update(dialect.extra_chunk_fields(instance))
    headers = dialect.reply_headers(call.request, instance) if dialect.reply_headers else None
    return json_response(reply, headers=headers)


def _request_id(request: web.Request, explicit: str | None) -> str:
    return explicit or request.headers.get("X-Request-Id") or uuid.uuid4().hex


class _Sse:
    """An SSE reply whose HTTP 200 goes out at once, or with its first frame (SGLang)."""

    def __init__(self, request: web.Request, dialect: Dialect) -> None:
        self.request = request
        self.headers = dialect.stream_headers
        self.response: web.StreamResponse | None = None

    async def open(self) -> None:
        if self.response is None:
            self.response = await start_sse(self.request, self.headers)

    async def write(self, data: bytes) -> None:
        await self.open()
        assert self.response is not None
        await self.response.write(data)

    async def close(self) -> web.StreamResponse:
        await self.open()
        assert self.response is not None
        await self.response.write_eof()
        return self.response


def _head(call: Call, dialect: Dialect, reply_id: str, model: str) -> dict[str, Any]:
    head = {
        "id": reply_id,
        "object": "chat.completion.chunk" if call.chat else "text_completion",
        "created": unix_now(),
        "model": model,
        **(dialect.extra_chunk_fields(call.instance) if dialect.extra_chunk_fields else {}),
    }
    if dialect.name == "tgi":  # serde's tag="object" puts "object" first
        head = {"object": head.pop("object"), **head}
    return head


async def _stream_refusal(call: Call, dialect: Dialect, error: ApiError) -> web.StreamResponse:
    """HTTP 200, the error event, (SGLang: the usage chunk if asked), then ``[DONE]``."""
    sse = _Sse(call.request, dialect)
    prefix = dialect.sse_prefix
    frames = prefix + (error.stream_body or b"") + b"\n\n"
    if dialect.name == "sglang" and dialect.usage(call)[0]:
        usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": 0, "total_tokens": call.prompt_tokens}
        model = call.body.model or "default"
        frames += prefix + encode({**_head(call, dialect, "", model), "choices": [], "usage": usage}) + b"\n\n"
    await sse.write(frames + prefix + b"[DONE]\n\n")
    return await sse.close()


async def _stream(
    call: Call, dialect: Dialect, generation: Generation, reply_id: str, model: str
) -> web.StreamResponse:
    sse = _Sse(call.request, dialect)
    if not dialect.headers_on_first_frame:
        await sse.open()
    prefix = dialect.sse_prefix
    chat = call.chat
    usage_at_end, usage_always = dialect.usage(call)
    if not chat and dialect.completion_final_usage:
        usage_at_end, usage_always = False, False
    head = _head(call, dialect, reply_id, model)
    if chat and dialect.usage_null_on_chunks:
        head["usage"] = None
    choice_extra = dialect.extra_choice_fields or {}
    finish_map = {} if chat else (dialect.completion_stream_finish_map or {})
    running_finish = None if chat else dialect.completion_running_finish

    def frame(choices: list[dict[str, Any]], produced: int | None = None, **extra: Any) -> bytes:
        body = {**head, "choices": choices, **extra}
        if usage_always and produced is not None:
            body["usage"] = {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": produced,
                "total_tokens": generation.prompt_tokens + produced,
            }
        return prefix + encode(body) + b"\n\n"

    def choice(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if finish is None and not chat:
            finish = running_finish
        if chat:
            delta: dict[str, Any] = {}
            if dialect.reasoning_content_delta:
                delta["reasoning_content"] = None
            if first or dialect.role_on_every_chunk:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **choice_extra}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish, **choice_extra}

    sent = 0
    # vLLM and SGLang send the role chunk on their first engine output (with the first token, after
    # prefill), not on acceptance: a proxy must not read "accepted" as "first byte".
    role_pending = chat and not dialect.role_on_every_chunk
    seq = generation.seq

    def tokens(upto: int, finish: str | None) -> list[bytes]:
        """Frames for the tokens not sent yet; ``finish`` (when given) ends the reply."""
        nonlocal sent, role_pending
        out: list[bytes] = []
        if role_pending and (upto > sent or finish is not None):
            out.append(frame([choice("", None, first=True)], 0))
            role_pending = False
        for index in range(sent, upto):
            last = finish is not None and index == upto - 1 and not dialect.separate_finish_chunk
            reason = finish_map.get(finish, finish) if last else None
            final = {"usage": _usage(generation)} if last and not chat and dialect.completion_final_usage else {}
            out.append(frame([choice(generation.piece(index), reason)], index + 1, **final))
        if finish is not None and (dialect.separate_finish_chunk or upto == sent):
            out.append(frame([choice(None if dialect.separate_finish_chunk else "", finish)]))
        sent = upto
        return out

    async for produced in generation.updates():
        if seq.finish_reason == "abort":
            break  # below
        frames = tokens(produced, seq.finish_reason if seq.finished else None)
        if frames:
            await sse.write(b"".join(frames))
    if seq.finish_reason == "abort":
        if generation.error is not None and dialect.abort_error is not None:
            error = dialect.abort_error(*generation.error)
            await sse.write(prefix + (error.stream_body or b"") + b"\n\n")
        elif dialect.finish_on_abort:
            await sse.write(b"".join(tokens(seq.output, "abort")))
    if usage_at_end:
        extra = {"usage": _usage(generation)}
        await sse.write(frame([], **extra))
    await sse.write(prefix + b"[DONE]\n\n")
    return await sse.close()


async def models_list(instance: Instance, entry: Callable[[str, str | None], dict[str, Any]]) -> web.Response:
    data = [entry(instance.config.model, None)]
    data += [entry(name, instance.config.model) for name in instance.lora_adapters]
    return json_response({"object": "list", "data": data})


def add_routes(app: web.Application, dialect: Dialect) -> None:
    """Register ``/v1/chat/completions`` and ``/v1/completions`` in ``dialect``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        return await handle(request, dialect, chat=True)

    async def text(request: web.Request) -> web.StreamResponse:
        return await handle(request, dialect, chat=False)

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", text)
