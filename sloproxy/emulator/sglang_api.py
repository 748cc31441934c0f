"""SGLang's HTTP server surface (native ``/generate`` plus OpenAI routes and admin routes), as SGLang
0.5.23's Python frontend serves it (tests/test_contract_sglang.py)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web

from . import openai_routes
from .http_common import (
    ApiError,
    DecodeProblem,
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
from .openai_routes import Admission, Call, ChatRequest, Dialect
from .tokens import piece_id
from .versions import SGLANG_NO_GET_LOAD

QUEUE_FULL = "The request queue is full."
EVICTED = "The request is aborted by a higher priority request."
LOWEST_PRIORITY = -(2**63)  # a request without a priority, under priority scheduling (higher runs first)


def sglang_error(status: int, message: str, type_: str, param: str | None) -> dict:
    """The flat ErrorResponse every OpenAI-route error uses (``param`` is never set)."""
    return {"object": "error", "message": message, "type": type_, "param": param, "code": status}


def stream_error(status: int, message: str, type_: str | None = None) -> bytes:
    """The nested error frame a stream carries after HTTP 200 (``type``: the status's name)."""
    body = sglang_error(status, message, type_ or HTTPStatus(status).name, None)
    return json.dumps({"error": body}).encode()


def _bad(message: str, type_: str = "BadRequestError") -> ApiError:
    return ApiError(400, sglang_error(400, message, type_, None))


def request_limits(context: int, kv_tokens: int) -> tuple[int, int]:
    """(max_req_len, max_req_input_len) as the scheduler derives them from the context length and the
    KV pool's size in tokens; it refuses a prompt of max_req_input_len tokens or more."""
    max_req_len = min(context - 1, kv_tokens - 1)
    return max_req_len, max_req_len - 5


def limits(instance: Instance) -> tuple[int, int, int]:
    """(context length, max_req_len, max_req_input_len) of this instance."""
    context = instance.max_model_len
    kv_tokens = instance.engine.kv.num_blocks * instance.engine.kv.block_size
    return context, *request_limits(context, kv_tokens)


def _context_checks(instance: Instance, prompt: int, requested: int | None) -> None:
    """The tokenizer manager's checks (a ValueError there: HTTP 400 even for a stream)."""
    message = context_refusal(instance.max_model_len, prompt, requested)
    if message is not None:
        raise _bad(message)


def context_refusal(context: int, prompt: int, requested: int | None) -> str | None:
    """The tokenizer manager's refusal of a request over the context length, or None (pure: the
    simulator uses it too)."""
    if prompt >= context:
        return f"The input ({prompt} tokens) is longer than the model's context length ({context} tokens)."
    if requested is not None and prompt + requested > context:
        return (
            f"Requested token count exceeds the model's maximum context length of {context} tokens. "
            f"You requested a total of {prompt + requested} tokens: {prompt} tokens from the input messages "
            f"and {requested} tokens for the completion. Please reduce the number of tokens in the input "
            "messages or the completion to fit within the limit."
        )
    return None


def _scheduler_checks(instance: Instance, prompt: int, priority: int | None) -> None:
    """The scheduler's checks: its input limit, then the waiting-queue limit. It answers with an abort,
    which a non-streamed request gets as an HTTP error and a stream as an error frame after HTTP 200."""
    _, _, max_input = limits(instance)
    if prompt >= max_input:
        message = (
            f"Input length ({prompt} tokens) exceeds the maximum allowed length ({max_input} tokens). "
            "Use a shorter input or enable --allow-auto-truncate."
        )
        raise ApiError(400, sglang_error(400, message, "BadRequestError", None), stream_body=stream_error(400, message))
    limit = instance.config.max_queued_requests
    engine = instance.engine
    if limit is None or len(engine.waiting) + 1 <= limit:
        return
    if engine.priority_scheduling and len(engine.waiting):
        # The least preferred waiting request (lowest priority; the newest on ties) makes room for a
        # strictly better one.
        victim = min(engine.waiting, key=lambda seq: (seq.priority, -seq.arrival, -seq.order))
        incoming = LOWEST_PRIORITY if priority is None else priority
        if incoming > victim.priority and instance.abort(victim.rid, (503, EVICTED)):
            return
    raise queue_full()


def queue_full(message: str = QUEUE_FULL) -> ApiError:
    return ApiError(503, sglang_error(503, message, "503", None), stream_body=stream_error(503, message))


def _abort_error(status: int, message: str) -> ApiError:
    type_ = "BadRequestError" if status == 400 else str(status)
    return ApiError(status, sglang_error(status, message, type_, None), stream_body=stream_error(status, message))


def _decode_error(problem: DecodeProblem) -> ApiError:
    """FastAPI's RequestValidationError, answered 400 in the flat shape with the HTTP phrase as type."""
    kind = {"missing": "missing", "json_invalid": "json_invalid"}.get(problem.kind, "invalid")
    entry = {
        "type": kind,
        "loc": ("body", *problem.loc),
        "msg": "Field required" if problem.kind == "missing" else problem.detail,
    }
    return ApiError(400, sglang_error(400, f"1 validation error:\n  {entry} [{entry}]", "Bad Request", None))


def _override(request: web.Request, header: str, cast: type) -> Any:
    """An ``x-override-*`` header's value (None when absent); a bad one is a 400."""
    value = request.headers.get(header)
    if value is None:
        return None
    try:
        return cast(value)
    except ValueError as exc:
        raise ApiError(400, sglang_error(400, f"invalid {header} header {value!r}: {exc}", "400", None)) from None


def _usage(call: Call) -> tuple[bool, bool]:
    options = call.body.stream_options or {}  # "{}" is the same as none: include_usage defaults to false
    return bool(options.get("include_usage")), False


def _admit(instance: Instance, call: Call) -> Admission:
    """SGLang's checks in its order: request validation, header overrides, tokenizer, scheduler."""
    body = call.body
    model = body.model if body.model is not None else "default"  # echoed as sent; any name is accepted
    served = instance.config.model
    if ":" in model and model != served:  # "base:adapter" asks for a LoRA adapter
        adapter = model[len(served) + 1 :] if model.startswith(served + ":") else model.split(":", 1)[1]
        if adapter.strip():
            raise _bad(
                f"LoRA adapter '{adapter.strip()}' was requested, but LoRA is not enabled. Please launch the "
                "server with --enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter "
                "endpoint."
            )
    if isinstance(body, ChatRequest):
        if not body.messages:
            raise _bad("Messages cannot be empty.")
        requested = body.max_completion_tokens or call.max_tokens
        configured = instance.config.max_model_len  # --context-length as given (None: not set)
        if requested and configured and requested > configured:
            raise _bad(
                f"max_completion_tokens is too large: {requested}."
                f"This model supports at most {configured} completion tokens."
            )
    else:
        if call.max_tokens is not None and call.max_tokens <= 0:
            entry = {"type": "value_error", "loc": ("body", "max_tokens"), "msg": "max_tokens must be positive"}
            raise ApiError(400, sglang_error(400, f"1 validation error:\n  {entry} [{entry}]", "Bad Request", None))
        if not call.prompt and call.prompt_ids is None:
            raise _bad("Prompt cannot be empty")
        requested = 16 if body.max_tokens is msgspec.UNSET else call.max_tokens
    priority, rid = body.priority, body.rid
    if instance.config.request_header_overrides and call.chat:  # not applied on /v1/completions
        rid = _override(call.request, "x-override-rid", str) or rid
        header_priority = _override(call.request, "x-override-priority", int)
        priority = priority if header_priority is None else header_priority
    _context_checks(instance, call.prompt_tokens, requested)
    _scheduler_checks(instance, call.prompt_tokens, priority)
    return Admission(
        model,
        max_new_tokens(instance, call.prompt_tokens, requested),
        engine_priority(instance, priority),
        rid or f"{'chatcmpl-' if call.chat else 'cmpl-'}{uuid.uuid4().hex}",
    )


def clamp_max_new_tokens(max_req_len: int, prompt: int, requested: int | None) -> int:
    """The scheduler's clamp: what was asked (no limit when None), within max_req_len - prompt - 1."""
    return max(1, min(requested if requested is not None else 1 << 30, max_req_len - prompt - 1))


def max_new_tokens(instance: Instance, prompt: int, requested: int | None) -> int:
    return clamp_max_new_tokens(limits(instance)[1], prompt, requested)


def engine_priority(instance: Instance, priority: int | None) -> int:
    """Ignored without priority scheduling; with it, a request without one ranks last."""
    if not instance.engine.priority_scheduling:
        return 0
    return LOWEST_PRIORITY if priority is None else priority


def _dialect(instance: Instance) -> Dialect:
    return Dialect(
        name="sglang",
        error=sglang_error,
        admit=partial(_admit, instance),
        decode_error=_decode_error,
        usage=_usage,
        separate_finish_chunk=True,
        reasoning_content_delta=True,
        chat_id_prefix="",
        completion_id_prefix="",
        headers_on_first_frame=True,
        extra_choice_fields={"matched_stop": None},
        abort_error=_abort_error,
    )


class SamplingParams(msgspec.Struct):
    max_new_tokens: int | None = None  # None: 128, and no prompt + max_new_tokens check
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

    dialect = _dialect(instance)

    def bad(message: str, status: int = 400) -> ApiError:
        return ApiError(status, {"error": {"message": message}})  # native routes: the message only

    def native_abort(error: ApiError, prompt_tokens: int, rid: str | None) -> dict[str, Any]:
        """A native stream's frame for a scheduler abort: a normal output whose finish_reason says why."""
        message = error.body["message"]
        meta = {"id": rid, "prompt_tokens": prompt_tokens, "completion_tokens": 0, "cached_tokens": 0}
        meta["finish_reason"] = {"type": "abort", "message": message, "status_code": error.status}
        return {"text": "", "output_ids": [], "meta_info": meta}

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
        priority, rid = body.priority, body.rid
        try:
            if params.max_new_tokens is not None and params.max_new_tokens < 0:
                raise _bad(f"max_new_tokens must be at least 0, got {params.max_new_tokens}.")
            if instance.config.request_header_overrides:
                rid = _override(request, "x-override-rid", str) or rid
                header_priority = _override(request, "x-override-priority", int)
                priority = priority if header_priority is None else header_priority
            _context_checks(instance, prompt_tokens, params.max_new_tokens)
            try:
                _scheduler_checks(instance, prompt_tokens, priority)
            except ApiError as error:
                if not body.stream:
                    raise bad(error.body["message"]) if error.status == 400 else error from None
                response = await start_sse(request)
                await response.write(b"data: " + encode(native_abort(error, prompt_tokens, rid)) + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
        except ApiError as error:
            if error.status != 400 or error.stream_body is not None:
                raise
            message = error.body["message"] if "message" in error.body else error.body["error"]["message"]
            if not body.stream:
                raise bad(message) from None
            # The native stream is lazy: even the tokenizer's refusal arrives inside it, after HTTP 200.
            frame = {"error": {"message": message, "type": "invalid_request_error", "code": 400, "retryable": False}}
            response = await start_sse(request)
            await response.write(b"data: " + encode(frame) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        started = instance.now()
        requested = params.max_new_tokens if params.max_new_tokens is not None else 128
        generation = instance.submit(
            prompt,
            max_new_tokens(instance, prompt_tokens, requested),
            rid=rid,
            ignore_eos=params.ignore_eos,
            priority=engine_priority(instance, priority),
            min_tokens=params.min_new_tokens,
            prompt_ids=ids,
        )
        try:
            if not body.stream:
                async for _ in generation.updates():
                    pass
                if generation.error is not None:
                    raise _abort_error(*generation.error)
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
                "parent": parent,
                "max_model_len": None if parent else instance.max_model_len,
            }

        return await openai_routes.models_list(instance, card)

    async def model_card(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model != instance.config.model:  # only the served name; nested OpenAI-style 404
            error = {"message": f"The model '{model}' does not exist", "type": "invalid_request_error"}
            error.update(param="model", code="model_not_found")
            return json_response({"error": error}, status=404)
        card = {"id": model, "object": "model", "created": unix_now(), "owned_by": "sglang", "root": model}
        return json_response({**card, "parent": None, "max_model_len": instance.max_model_len})

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
        """No context length here (it is in /v1/models and the sglang:context_len gauge)."""
        model = instance.config.model
        return json_response(
            {
                "model_path": model,
                "served_model_name": model,
                "tokenizer_path": model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "load_format": "auto",
                "reasoning_parser": None,
                "tool_call_parser": None,
                "disaggregation_mode": "null",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": None,
                "architectures": None,
            }
        )

    async def server_info(request: web.Request) -> web.Response:
        """The resolved server arguments (flat) plus the scheduler's limits and per-rank states."""
        engine = instance.engine
        _, _, max_input = limits(instance)
        capacity = engine.kv.num_blocks * engine.kv.block_size
        legacy = instance.version < SGLANG_NO_GET_LOAD
        return json_response(
            {
                "model_path": instance.config.model,
                "served_model_name": instance.config.model,
                # --context-length as given: null unless set (the effective length is in /v1/models)
                "context_length": instance.max_model_len if legacy else instance.config.max_model_len,
                "chunked_prefill_size": engine.token_budget,
                "max_running_requests": engine.max_num_seqs,
                "max_queued_requests": instance.config.max_queued_requests,
                "enable_priority_scheduling": engine.priority_scheduling,
                "schedule_low_priority_values_first": False,
                "page_size": engine.kv.block_size,
                "max_total_num_tokens": capacity,
                "max_req_input_len": max_input,
                "startup_time": instance.started_at,
                "internal_states": [
                    {
                        "last_gen_throughput": _throughput(instance),
                        "effective_max_running_requests_per_dp": engine.max_num_seqs,
                        "memory_usage": {"token_capacity": capacity},
                    }
                ],
                "version": instance.version_string,
                "frontend": "python",
            }
        )

    async def loads(request: web.Request) -> web.Response:
        """``GET /v1/loads``: one load snapshot per DP rank (one rank here)."""
        engine = instance.engine
        try:
            rank = int(request.query["dp_rank"]) if "dp_rank" in request.query else None
        except ValueError:
            raise ApiError(400, {"detail": "dp_rank must be an integer"}) from None
        block = engine.kv.block_size
        used = engine.kv.used * block
        capacity = engine.kv.num_blocks * block
        queries = engine.kv.queries_tokens
        load = {
            "timestamp": time.time(),
            "dp_rank": 0,
            "num_running_reqs": len(engine.running),
            "num_waiting_reqs": len(engine.waiting),
            "num_waiting_uncached_tokens": sum(seq.to_feed for seq in engine.waiting),
            "num_used_tokens": used,
            "num_total_tokens": used + sum(seq.prompt_len + seq.output for seq in engine.waiting),
            "num_active_tokens": used + sum(seq.prompt_len + seq.output for seq in engine.waiting),
            "num_prealloc_ready_tokens": 0,
            "max_total_num_tokens": capacity,
            "max_running_requests": engine.max_num_seqs,
            "token_usage": round(engine.kv.usage, 4),
            "gen_throughput": round(_throughput(instance), 2),
            "cache_hit_rate": round(engine.kv.hits_tokens / queries, 4) if queries else 0.0,
            "utilization": round(len(engine.running) / engine.max_num_seqs, 4),
            "total_prefill_uncached_tokens": engine.stats.prompt_tokens,
            "total_prefill_busy_us": 0,
            "decode_moments": None,
            "memory": {"weight_gb": 0.0, "kv_cache_gb": 0.0, "graph_gb": 0.0, "token_capacity": capacity},
            "disaggregation": {
                "mode": "null",
                "prefill_bootstrap_queue_reqs": 0,
                "prefill_inflight_queue_reqs": 0,
                "decode_prealloc_queue_reqs": 0,
                "decode_transfer_queue_reqs": 0,
                "decode_retracted_queue_reqs": 0,
                "kv_transfer_speed_gb_s": 0.0,
                "kv_transfer_latency_ms": 0.0,
            },
            "queues": {"waiting": len(engine.waiting), "grammar": 0, "paused": 0, "retracted": 0, "prealloc_ready": 0},
        }
        return json_response(
            {
                "timestamp": datetime.now(UTC).isoformat(),
                "version": instance.version_string,
                "accelerator": None,
                "num_accelerators": 1,
                "loads": [load] if rank in (None, 0) else [],
            }
        )

    async def get_load(request: web.Request) -> web.Response:
        """Before 0.5.3 only (as the emulator modelled 0.5.2); removed since."""
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
        await instance.wake_up()  # everything: a partial resume is not modelled
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=render_metrics(instance), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    app.router.add_post("/generate", generate)
    openai_routes.add_routes(app, dialect)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model_card)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_model_info", model_info)  # deprecated alias
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/get_server_info", server_info)  # deprecated alias
    app.router.add_get("/v1/loads", loads)
    if instance.version < SGLANG_NO_GET_LOAD:
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
