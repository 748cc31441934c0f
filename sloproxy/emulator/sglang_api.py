"""SGLang's HTTP server surface (native ``/generate`` plus OpenAI routes and admin routes)."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from . import openai_routes
from .http_common import (
    ApiError,
    decode_body,
    encode,
    json_object,
    json_response,
    new_app,
    start_sse,
    unix_now,
)
from .instance import Generation, Instance
from .metrics_text import render_metrics
from .openai_routes import Dialect
from .tokens import piece_id

SGLANG_VERSION = "0.5.2"


def sglang_error(status: int, message: str, type_: str, param: str | None) -> dict:
    return {"object": "error", "message": message, "type": type_, "param": param, "code": status}


def _context_message(prompt_tokens: int, requested: int | None, limit: int) -> str:
    if prompt_tokens >= limit:
        return f"The input ({prompt_tokens} tokens) is longer than the model's context length ({limit} tokens)."
    return (
        f"Requested token count exceeds the model's maximum context length of {limit} tokens. "
        f"You requested a total of {prompt_tokens + (requested or 0)} tokens: {prompt_tokens} tokens "
        f"from the input messages and {requested} tokens for the completion."
    )


DIALECT = Dialect(
    name="sglang",
    error=sglang_error,
    separate_finish_chunk=True,
    chat_id_prefix="",
    completion_id_prefix="",
    extra_choice_fields={"matched_stop": None},
    context_error_message=_context_message,
)


class SamplingParams(msgspec.Struct):
    max_new_tokens: int = 128
    ignore_eos: bool = False
    min_new_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None


class GenerateRequest(msgspec.Struct):
    text: str | list[str] | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    rid: str | None = None
    priority: int | None = None
    lora_path: str | None = None


def _finish_reason(generation: Generation) -> dict[str, Any] | None:
    seq = generation.seq
    if not seq.finished:
        return None
    if seq.finish_reason == "length":
        return {"type": "length", "length": seq.output}
    if seq.finish_reason == "abort":
        return {"type": "abort", "message": "Abort before prefill" if not seq.output else "Abort in waiting queue"}
    return {"type": "stop", "matched": 128009}


def _meta(generation: Generation, started: float, instance: Instance) -> dict[str, Any]:
    seq = generation.seq
    meta: dict[str, Any] = {
        "id": seq.rid,
        "finish_reason": _finish_reason(generation),
        "prompt_tokens": generation.prompt_tokens,
        "weight_version": "default",
        "completion_tokens": seq.output,
        "cached_tokens": seq.cached_tokens,
    }
    if seq.finished:
        meta["e2e_latency"] = (seq.finished_at or instance.now()) - started
    return meta


def build_app(instance: Instance) -> web.Application:
    app = new_app(instance)

    def bad(message: str, status: int = 400) -> ApiError:
        return ApiError(status, sglang_error(status, message, "BadRequestError", None))

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, GenerateRequest, bad)
        if body.input_ids is not None:
            prompt, ids = "", body.input_ids
        elif isinstance(body.text, str):
            prompt, ids = body.text, None
        elif isinstance(body.text, list) and len(body.text) == 1:
            prompt, ids = body.text[0], None
        else:
            raise bad("Either text or input_ids should be provided (one prompt per request).")
        prompt_tokens = len(ids) if ids is not None else instance.count_tokens_of(prompt)
        params = body.sampling_params
        if prompt_tokens >= instance.max_model_len:
            raise bad(_context_message(prompt_tokens, None, instance.max_model_len))
        if params.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be at least 0, got {params.max_new_tokens}.")
        limit = instance.config.max_queued_requests
        if limit is not None and len(instance.engine.waiting) >= limit:
            raise bad("The request queue is full.", 503)
        max_new = max(1, min(params.max_new_tokens, instance.max_model_len - prompt_tokens))
        started = instance.now()
        generation = instance.submit(
            prompt,
            max_new,
            rid=body.rid,
            ignore_eos=params.ignore_eos,
            priority=body.priority or 0,
            min_tokens=params.min_new_tokens,
            prompt_ids=ids,
        )
        try:
            if not body.stream:
                async for _ in generation.updates():
                    pass
                return json_response(_native_reply(generation, started, instance))
            response = await start_sse(request)
            async for _ in generation.updates():
                reply = _native_reply(generation, started, instance)
                await response.write(b"data: " + encode(reply) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            instance.release(generation)

    async def models(request: web.Request) -> web.Response:
        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": unix_now(),
                "owned_by": "sglang",
                "root": name,
                "max_model_len": instance.max_model_len,
            }

        return await openai_routes.models_list(instance, card)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if instance.healthy else 503)

    async def health_generate(request: web.Request) -> web.Response:
        if not instance.healthy:
            return web.Response(status=503)
        generation = instance.submit("health check", 1, ignore_eos=True)
        try:
            async for _ in generation.updates():
                pass
        finally:
            instance.release(generation)
        return web.Response(status=200)

    async def model_info(request: web.Request) -> web.Response:
        return json_response(
            {"model_path": instance.config.model, "tokenizer_path": instance.config.model, "is_generation": True}
        )

    async def server_info(request: web.Request) -> web.Response:
        engine = instance.engine
        return json_response(
            {
                "model_path": instance.config.model,
                "served_model_name": instance.config.model,
                "context_length": instance.max_model_len,
                "chunked_prefill_size": engine.token_budget,
                "max_running_requests": engine.max_num_seqs,
                "max_total_num_tokens": engine.kv.num_blocks * engine.kv.block_size,
                "enable_priority_scheduling": engine.priority_scheduling,
                "schedule_low_priority_values_first": False,
                "page_size": engine.kv.block_size,
                "version": SGLANG_VERSION,
                "internal_states": [{"last_gen_throughput": _throughput(instance), "memory_usage": {}}],
            }
        )

    async def get_load(request: web.Request) -> web.Response:
        engine = instance.engine
        pending = sum(s.to_feed for s in engine.running)
        return json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": len(engine.running) + len(engine.waiting),
                    "num_waiting_reqs": len(engine.waiting),
                    "num_tokens": engine.kv.used * engine.kv.block_size,
                    "num_pending_tokens": pending,
                    "ts_tic": time.time(),
                }
            ]
        )

    async def flush_cache(request: web.Request) -> web.Response:
        if not instance.engine.idle:
            return web.Response(status=400, text="Flush cache failed.\n")
        instance.engine.reset_prefix_cache()
        return web.Response(
            text=(
                "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                "waiting requests, the operation will not be performed.)\n"
            )
        )

    async def abort_request(request: web.Request) -> web.Response:
        body = await json_object(request, bad)
        if body.get("abort_all"):
            instance.abort_all()
        elif isinstance(body.get("rid"), str):
            instance.abort(body["rid"])
        else:
            raise ApiError(400, {"error": {"message": "rid or abort_all is required"}})
        return web.Response(status=200)

    async def memory_tags(request: web.Request) -> None:
        """``{"tags": [...]}`` (optional; default both) names what to release or resume."""
        body = await json_object(request, bad) if request.can_read_body else {}
        tags = body.get("tags", ["weights", "kv_cache"])
        if not isinstance(tags, list) or not tags or not set(tags) <= {"weights", "kv_cache"}:
            raise bad("tags must be a non-empty list of 'weights' and 'kv_cache'")

    # Like vLLM's sleep level 1 and wake_up: the same modelled costs (weights over PCIe to host memory).
    async def release_memory(request: web.Request) -> web.Response:
        await memory_tags(request)
        await instance.sleep(1)
        return web.Response(status=200)

    async def resume_memory(request: web.Request) -> web.Response:
        await memory_tags(request)
        await instance.wake_up()
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=render_metrics(instance), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    app.router.add_post("/generate", generate)
    openai_routes.add_routes(app, DIALECT)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/get_load", get_load)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/release_memory_occupation", release_memory)
    app.router.add_post("/resume_memory_occupation", resume_memory)
    app.router.add_get("/metrics", metrics)
    return app


def _native_reply(generation: Generation, started: float, instance: Instance) -> dict[str, Any]:
    produced = generation.seq.output
    text = "".join(generation.piece(i) for i in range(produced))  # cumulative, as SGLang streams it
    ids = [piece_id(generation.piece(i)) for i in range(produced)]
    return {"text": text, "output_ids": ids, "meta_info": _meta(generation, started, instance)}


def _throughput(instance: Instance) -> float:
    stats = instance.engine.stats
    return stats.generation_tokens / stats.busy_seconds if stats.busy_seconds else 0.0
