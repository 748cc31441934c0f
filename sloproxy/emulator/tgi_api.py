"""TGI v3's router surface: native ``/generate`` and ``/generate_stream`` plus OpenAI routes.

TGI answers errors as ``{"error": "...", "error_type": "..."}``; inside a stream (both the
native and the OpenAI routes) it sends the error as an SSE event with HTTP status 200.
Older TGI (axum 0.6) wrote ``data:{json}`` without a space; TGI >= 2 (axum 0.7) writes
``data: {json}``. The emulator defaults to the former and takes ``sse_space`` for the latter.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from . import openai_routes
from .http_common import ApiError, decode_body, encode, json_response, new_app, start_sse
from .instance import Generation, Instance
from .metrics_text import render_metrics
from .openai_routes import Dialect
from .tokens import piece_id, token_ids, tokenize

TGI_VERSION = "3.3.4"
_FINISH = {"stop": "eos_token", "length": "length"}
_ERROR_TYPES = {422: "validation", 429: "overloaded", 424: "generation", 503: "unhealthy", 404: "validation"}


def tgi_error(status: int, message: str, type_: str, param: str | None) -> dict:
    return {"error": message, "error_type": _ERROR_TYPES.get(status, "validation")}


def _validation_message(prompt_tokens: int, requested: int | None, limit: int) -> str:
    return (
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
        f"Given: {prompt_tokens} `inputs` tokens and {requested or 0} `max_new_tokens`"
    )


def _dialect(instance: Instance) -> Dialect:
    return Dialect(
        name="tgi",
        error=tgi_error,
        sse_prefix=b"data: " if instance.config.sse_space else b"data:",
        role_on_every_chunk=True,
        empty_chat_id=True,
        completion_id_prefix="",
        echo_model=False,
        extra_chunk_fields=lambda inst: {"system_fingerprint": f"{TGI_VERSION}-native"},
        context_error_message=_validation_message,
        context_error_status=422,
    )


class GenerateParameters(msgspec.Struct):
    max_new_tokens: int | None = 100
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

    def invalid(message: str) -> ApiError:
        instance.engine.stats.rejected["validation"] += 1
        return ApiError(422, {"error": f"Input validation error: {message}", "error_type": "validation"})

    def admit(body: GenerateRequest) -> tuple[int, int]:
        """Validate as TGI's router does; returns (prompt tokens, max_new_tokens)."""
        if not body.inputs:
            raise invalid("`inputs` cannot be empty")
        prompt_tokens = instance.count_tokens_of(body.inputs)
        max_new = body.parameters.max_new_tokens or 100
        if max_new < 1:
            raise invalid("`max_new_tokens` must be strictly positive")
        if prompt_tokens + max_new > instance.max_model_len:
            instance.engine.stats.rejected["validation"] += 1
            raise ApiError(
                422,
                {
                    "error": _validation_message(prompt_tokens, max_new, instance.max_model_len),
                    "error_type": "validation",
                },
            )
        if instance.engine.num_in_flight >= instance.config.max_concurrent_requests:
            instance.engine.stats.rejected["overloaded"] += 1
            raise ApiError(429, {"error": "Model is overloaded", "error_type": "overloaded"})
        return prompt_tokens, max_new

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
        body = await decode_body(request, GenerateRequest, invalid)
        if body.stream:
            return await generate_stream_body(request, body)
        _, max_new = admit(body)
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
        body = await decode_body(request, GenerateRequest, invalid)
        return await generate_stream_body(request, body)

    async def generate_stream_body(request: web.Request, body: GenerateRequest) -> web.StreamResponse:
        try:
            _, max_new = admit(body)
        except ApiError as error:  # inside a stream, TGI reports errors as an event
            response = await start_sse(request)
            await response.write(prefix + encode(error.body) + b"\n\n")
            await response.write_eof()
            return response
        generation = instance.submit(body.inputs, max_new)
        response = await start_sse(request)
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
        body = await decode_body(request, GenerateRequest, invalid)
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
                "max_input_tokens": instance.max_model_len - 1,
                "max_total_tokens": instance.max_model_len,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": TGI_VERSION,
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
