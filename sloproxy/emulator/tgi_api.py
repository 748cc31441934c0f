"""TGI v3's router surface: native ``/generate`` and ``/generate_stream`` plus OpenAI routes, as TGI
3.3.x serves them (tests/test_contract_tgi.py).

TGI answers errors as ``{"error": "...", "error_type": "..."}``. Its SSE replies start (HTTP 200)
before the request is validated or given a concurrency permit, so a streamed request learns of a
refusal inside the stream: on the OpenAI routes as ``{"error": {"message", "http_status_code": 422}}``
followed by ``[DONE]``, on ``/generate_stream`` as ``{"error", "error_type"}``. Frames are
``data: {json}`` (axum >= 0.7, TGI >= 2.1); an ``engine_version`` below 2.1 or ``sse_space: false``
writes ``data:{json}`` as older TGI did.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from aiohttp import web

from . import openai_routes
from .http_common import ApiError, DecodeProblem, decode_request, encode, json_response, new_app, start_sse
from .instance import Generation, Instance
from .metrics_text import render_metrics
from .openai_routes import Admission, Call, ChatRequest, Dialect
from .tokens import piece_id, token_ids, tokenize
from .versions import TGI_AUTO_MAX_NEW_TOKENS, TGI_CHUNKED_GENERATION, TGI_SSE_SPACE

GENERATION_ROUND = 1024  # DEFAULT_GENERATION_LENGTH: the most one scheduling round generates
OVERLOADED = "Model is overloaded"
_FINISH = {"stop": "eos_token", "length": "length"}
_ERROR_TYPES = {422: "validation", 429: "overloaded", 424: "generation", 503: "unhealthy", 404: "validation"}


def tgi_error(status: int, message: str, type_: str, param: str | None) -> dict:
    return {"error": message, "error_type": _ERROR_TYPES.get(status, "validation")}


def sse_prefix(instance: Instance) -> bytes:
    space = instance.config.sse_space
    if space is None:
        space = instance.version >= TGI_SSE_SPACE
    return b"data: " if space else b"data:"


def max_input_tokens(instance: Instance) -> int:
    return instance.max_model_len - 1


class Refused(Exception):
    """A request TGI's router refuses: its ``error_type`` and message (the Display of InferError)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def status(self) -> int:
        return 429 if self.error_type == "overloaded" else 422


def _invalid(message: str) -> Refused:
    return Refused("validation", f"Input validation error: {message}")


def acquire(instance: Instance) -> None:
    """The concurrency permit, taken before validation and never queued."""
    if instance.engine.num_in_flight >= instance.config.max_concurrent_requests:
        instance.engine.stats.rejected["overloaded"] += 1
        raise Refused("overloaded", OVERLOADED)


def output_limit(max_total: int, prompt: int, requested: int | None, version: tuple[int, ...]) -> int:
    """Validate lengths as the router does and return the most tokens the reply can have.

    Pure (the simulator can call it): ``max_total`` is max_total_tokens, max_input_tokens is one less.
    Each scheduling round asks for ``min(max_new_tokens, 1024)`` (the rest of the window when
    ``max_new_tokens`` is absent) and must fit the window; after a round that ran out, the router
    re-validates the longer input and schedules another round while the reply is under
    ``max_new_tokens``; once that fails the reply ends with finish_reason ``length``. Raises
    :class:`Refused` (validation) when the first round does not fit.
    """
    max_input = max_total - 1
    chunked = version >= TGI_CHUNKED_GENERATION
    if requested is None and version < TGI_AUTO_MAX_NEW_TOKENS:
        requested = 100  # before 3.0 /generate defaulted max_new_tokens to 100

    def round_tokens(inputs: int) -> int:
        wanted = requested if requested is not None else max(max_total - inputs, 0)
        tokens = min(wanted, GENERATION_ROUND) if chunked else wanted
        if inputs + tokens > max_total:
            raise _invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
                f"Given: {inputs} `inputs` tokens and {tokens} `max_new_tokens`"
            )
        if inputs > max_input:
            raise _invalid(f"`inputs` must have less than {max_input} tokens. Given: {inputs}")
        return tokens

    generated = round_tokens(prompt)
    total = requested if requested is not None else max(max_total - prompt, 0)
    while chunked and generated < total:
        try:
            more = round_tokens(prompt + generated)
        except Refused:
            break
        if more == 0:
            break
        generated += more
    return generated


def validate(instance: Instance, prompt: int, requested: int | None, *, temperature=None, top_p=None) -> int:
    """The router's parameter checks, then the lengths (:func:`output_limit`)."""
    if temperature is not None and temperature < 0:  # 0 means greedy on the OpenAI routes
        raise _invalid("`temperature` must be strictly positive")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise _invalid("`top_p` must be > 0.0 and < 1.0")
    if requested == 0:
        raise _invalid("`max_new_tokens` must be strictly positive")
    return output_limit(instance.max_model_len, prompt, requested, instance.version)


def _counted(instance: Instance, refused: Refused) -> Refused:
    if refused.error_type != "overloaded":  # acquire() counted its own
        instance.engine.stats.rejected[refused.error_type] += 1
    return refused


def _openai_error(instance: Instance, refused: Refused) -> ApiError:
    """A real status when not streaming; inside a stream the OpenAI-style event, always 422."""
    event = encode({"error": {"message": refused.message, "http_status_code": 422}})
    body = {"error": refused.message, "error_type": refused.error_type}
    return ApiError(refused.status, body, stream_body=event)


def _axum_rejection(problem: DecodeProblem) -> ApiError:
    """axum's Json extractor: plain-text rejections, 400 for bad JSON and 422 for the wrong shape."""
    if problem.syntax:
        return ApiError(400, f"Failed to parse the request body as JSON: {problem.detail}")
    where = ".".join(map(str, problem.loc))
    return ApiError(422, f"Failed to deserialize the JSON body into the target type: {where}: {problem.detail}")


def _admit(instance: Instance, call: Call) -> Admission:
    body = call.body
    if isinstance(body, ChatRequest):
        # The request's model is echoed unless absent or "tgi"; any other name is a LoRA adapter id.
        model = body.model if body.model not in (None, "tgi") else instance.config.model
        requested = call.max_tokens if call.max_tokens is not None else body.max_completion_tokens
    else:
        if body.suffix is not None:  # refused before the stream starts
            message = "Suffix is not supported and can be achieved by preprocessing the prompt."
            raise ApiError(422, {"error": message, "error_type": "suffix not supported"})
        model, requested = instance.config.model, call.max_tokens
    if requested is not None and requested < 0:  # u32: a deserialization failure
        raise _axum_rejection(DecodeProblem("invalid", ("max_tokens",), "invalid value: integer, expected u32"))
    temperature = body.temperature if body.temperature != 0 else None
    try:
        acquire(instance)
        limit = validate(instance, call.prompt_tokens, requested, temperature=temperature, top_p=body.top_p)
    except Refused as refused:
        raise _openai_error(instance, _counted(instance, refused)) from None
    return Admission(model, limit)


def _usage(call: Call) -> tuple[bool, bool]:
    options = call.body.stream_options or {}
    return bool(options.get("include_usage")), False


def _dialect(instance: Instance) -> Dialect:
    return Dialect(
        name="tgi",
        error=tgi_error,
        admit=partial(_admit, instance),
        decode_error=_axum_rejection,
        usage=_usage,
        sse_prefix=sse_prefix(instance),
        role_on_every_chunk=True,
        usage_null_on_chunks=True,
        completion_final_usage=True,
        completion_running_finish="",
        completion_stream_finish_map=_FINISH,
        empty_ids=True,
        finish_on_abort=False,
        stream_headers={"X-Accel-Buffering": "no"},
        extra_chunk_fields=lambda inst: {"system_fingerprint": f"{inst.version_string}-native"},
    )


class GenerateParameters(msgspec.Struct):
    max_new_tokens: int | None = None  # None: the rest of the window (100 before 3.0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    seed: int | None = None
    details: bool = False
    do_sample: bool = False
    return_full_text: bool | None = None
    truncate: int | None = None
    adapter_id: str | None = None
    decoder_input_details: bool = False


class GenerateRequest(msgspec.Struct):
    inputs: str
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False


def build_app(instance: Instance) -> web.Application:
    app = new_app(instance)
    dialect = _dialect(instance)
    prefix = dialect.sse_prefix

    def admit(body: GenerateRequest) -> int:
        """The router's order: the concurrency permit, then validation; returns the reply's token limit."""
        try:
            acquire(instance)
            if not body.inputs:
                raise _invalid("`inputs` cannot be empty")
            params = body.parameters
            prompt_tokens = instance.count_tokens_of(body.inputs)
            return validate(
                instance, prompt_tokens, params.max_new_tokens, temperature=params.temperature, top_p=params.top_p
            )
        except Refused as refused:
            _counted(instance, refused)
            raise ApiError(refused.status, {"error": refused.message, "error_type": refused.error_type}) from None

    def timing_headers(generation: Generation) -> dict[str, str]:
        seq = generation.seq
        queue = ((seq.first_scheduled or seq.arrival) - seq.arrival) * 1e3
        total = ((seq.finished_at or seq.arrival) - seq.arrival) * 1e3
        inference = total - queue
        per_token = inference / seq.output if seq.output else 0.0
        return {
            "x-compute-type": "gpu+optimized",
            "x-compute-time": f"{total / 1e3:.6f}",
            "x-total-time": f"{total:.0f}",
            "x-validation-time": "0",
            "x-queue-time": f"{queue:.0f}",
            "x-inference-time": f"{inference:.0f}",
            "x-time-per-token": f"{per_token:.0f}",
            "x-prompt-tokens": str(generation.prompt_tokens),
            "x-generated-tokens": str(seq.output),
        }

    def details(generation: Generation, stream: bool) -> dict[str, Any]:
        seq = generation.seq
        out: dict[str, Any] = {
            "finish_reason": _FINISH.get(seq.finish_reason or "stop", "length"),
            "generated_tokens": seq.output,
            "seed": None,
        }
        if stream:
            out["input_length"] = generation.prompt_tokens
        else:
            out["prefill"] = []
            out["tokens"] = [_token(generation, i) for i in range(seq.output)]
        return out

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await decode_request(request, GenerateRequest, _axum_rejection)
        if body.stream:
            return await generate_stream_body(request, body)
        max_new = admit(body)
        generation = instance.submit(body.inputs, max_new)
        try:
            async for _ in generation.updates():
                pass
            text = "".join(generation.piece(i) for i in range(generation.seq.output))
            if body.parameters.return_full_text:
                text = body.inputs + text
            reply: dict[str, Any] = {"generated_text": text}
            if body.parameters.details:
                reply["details"] = details(generation, stream=False)
            return json_response([reply] if request.path == "/" else reply, headers=timing_headers(generation))
        finally:
            instance.release(generation)

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        body = await decode_request(request, GenerateRequest, _axum_rejection)
        return await generate_stream_body(request, body)

    async def generate_stream_body(request: web.Request, body: GenerateRequest) -> web.StreamResponse:
        try:
            max_new = admit(body)
        except ApiError as error:  # inside a stream, TGI reports errors as an event (and no [DONE])
            response = await start_sse(request, {"X-Accel-Buffering": "no"})
            await response.write(prefix + encode(error.body) + b"\n\n")
            await response.write_eof()
            return response
        generation = instance.submit(body.inputs, max_new)
        response = await start_sse(request, {"X-Accel-Buffering": "no"})
        seq = generation.seq
        sent = 0
        try:
            async for produced in generation.updates():
                if seq.finish_reason == "abort":
                    break
                frames = []
                for index in range(sent, produced):
                    last = seq.finished and index == produced - 1
                    event: dict[str, Any] = {
                        "index": index + 1,
                        "token": _token(generation, index),
                        "generated_text": None,
                        "details": None,
                    }
                    if last:
                        event["generated_text"] = "".join(generation.piece(i) for i in range(produced))
                        if body.parameters.details:
                            event["details"] = details(generation, stream=True)
                    frames.append(prefix + encode(event) + b"\n\n")
                sent = produced
                await response.write(b"".join(frames))
            await response.write_eof()
            return response
        finally:
            instance.release(generation)

    async def tokenize_route(request: web.Request) -> web.Response:
        body = await decode_request(request, GenerateRequest, _axum_rejection)
        pieces, ids = tokenize(body.inputs), token_ids(body.inputs)
        out, offset = [], 0
        for piece, token_id in zip(pieces, ids, strict=True):
            out.append({"id": token_id, "text": piece, "start": offset, "stop": offset + len(piece)})
            offset += len(piece)
        return json_response(out)

    async def health(request: web.Request) -> web.Response:
        if instance.healthy:
            return web.Response(status=200)
        return json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)

    async def info(request: web.Request) -> web.Response:
        return json_response(
            {
                "model_id": instance.config.model,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": instance.config.max_concurrent_requests,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": max_input_tokens(instance),
                "max_total_tokens": instance.max_model_len,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": instance.version_string,
                "sha": None,
                "docker_label": None,
            }
        )

    async def models(request: web.Request) -> web.Response:
        model = instance.config.model
        return json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": model}]}
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render_metrics(instance), headers={"Content-Type": "text/plain"})

    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", generate)
    openai_routes.add_routes(app, dialect)
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    return app


def _token(generation: Generation, index: int) -> dict[str, Any]:
    piece = generation.piece(index)
    return {"id": piece_id(piece), "text": piece, "logprob": -0.5, "special": False}
