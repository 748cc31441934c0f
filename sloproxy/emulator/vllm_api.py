"""vLLM's OpenAI-compatible server surface, as vLLM 0.33.0 serves it (tests/test_contract_vllm.py).

An ``engine_version`` below 0.12 keeps the rules the emulator modelled as 0.11 (versions.py).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web

from . import openai_routes
from .http_common import ApiError, DecodeProblem, json_object, json_response, new_app, unix_now
from .instance import Instance
from .metrics_text import render_metrics
from .openai_routes import Admission, Call, ChatRequest, Dialect
from .tokens import VOCAB_SIZE, render_chat, token_ids, tokenize
from .versions import VLLM_CURRENT_RULES

PRIORITY_HEADER = "X-Vllm-Priority"
ORCA_FORMAT_HEADER = "endpoint-load-metrics-format"
ORCA_HEADER = "endpoint-load-metrics"
QUEUE_FULL = (
    "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance."
)


def vllm_error(status: int, message: str, type_: str, param: str | None, *, legacy: bool = False) -> dict:
    if legacy:
        return {"object": "error", "message": message, "type": type_, "param": param, "code": status}
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def current_rules(instance: Instance) -> bool:
    """False for an ``engine_version`` below 0.12: the rules the emulator modelled as 0.11."""
    return instance.version >= VLLM_CURRENT_RULES


def validation_message(message: str, parameter: str | None = None, value: Any = None) -> str:
    """A VLLMValidationError's text: the message plus `` (parameter=…, value=…)`` when known."""
    extras = [f"{key}={item}" for key, item in (("parameter", parameter), ("value", value)) if item is not None]
    return f"{message} ({', '.join(extras)})" if extras else message


def _decode_error(instance: Instance, problem: DecodeProblem) -> ApiError:
    legacy_errors = instance.config.legacy_errors
    if not current_rules(instance):
        what = "Invalid JSON body" if problem.syntax else "Invalid request"
        message = f"{what}: {problem.detail}"
        return ApiError(400, vllm_error(400, message, "BadRequestError", None, legacy=legacy_errors))
    # FastAPI's RequestValidationError, answered 400 with the phrase as type and param from the error's loc.
    kind = {"missing": "missing", "json_invalid": "json_invalid"}.get(problem.kind, "invalid")
    message = "Field required" if problem.kind == "missing" else problem.detail
    entry = {"type": kind, "loc": problem.dotted(), "msg": message}
    text = f"1 validation error:\n  {entry}"
    return ApiError(400, vllm_error(400, text, "Bad Request", problem.dotted(), legacy=legacy_errors))


def _usage(instance: Instance, call: Call) -> tuple[bool, bool]:
    options = call.body.stream_options
    if not current_rules(instance):  # older StreamOptions defaulted include_usage to true
        if options is None:
            return False, False
        return bool(options.get("include_usage", True)), False
    include = bool(options and options.get("include_usage"))
    return include, include and bool(options and options.get("continuous_usage_stats"))


def _admit(instance: Instance, call: Call) -> Admission:
    """vLLM's checks in its order: request schema, model, admission (queue), then lengths."""
    body = call.body
    current = current_rules(instance)
    error = partial(vllm_error, legacy=instance.config.legacy_errors)

    def refuse(message: str, param: str | None, value: Any = None, *, status: int = 400) -> ApiError:
        text = validation_message(message, param, value) if current else message
        return ApiError(status, error(status, text, "BadRequestError", param))

    if body.stream_options and not body.stream:  # a pydantic validator: "{}" and null pass
        raise refuse("Stream options can only be defined when `stream=True`.", "stream_options")
    model = _served_model(instance, body.model)
    priority = body.priority or 0
    if current:
        header = call.request.headers.get(PRIORITY_HEADER)
        if header is not None:
            with contextlib.suppress(ValueError):
                priority = int(header)
    elif priority != 0 and not instance.engine.priority_scheduling:
        raise refuse(f"Got priority {priority} but Priority scheduling is not enabled.", "priority")
    limit = instance.config.max_queued_requests
    if limit is not None and instance.engine.num_in_flight + 1 > limit:  # running + waiting, n slots
        if not instance.config.disable_log_stats:
            instance.engine.stats.rejected["max_num_queued_reqs"] += 1
        raise ApiError(503, error(503, QUEUE_FULL, "Service Unavailable", None))
    window = instance.max_model_len
    prompt = call.prompt_tokens
    if call.chat:
        assert isinstance(body, ChatRequest)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else call.max_tokens
    else:
        param, requested = "max_tokens", 16 if call.max_tokens is None else call.max_tokens
    if not current:
        return Admission(model, _legacy_max_tokens(refuse, window, prompt, requested), priority)
    if requested is not None and requested > window:
        raise refuse(
            f"{param}={requested} cannot be greater than max_model_len={window}. Please request fewer output tokens.",
            param,
            requested,
        )
    if prompt > window:
        # Text is tokenized with truncation at window + 1, so the count is a lower bound there.
        count = min(prompt, window + 1) if call.prompt_ids is None else prompt
        qualifier = "at least " if count == window + 1 else ""
        raise refuse(
            f"This model's maximum context length is {window} tokens. However, your prompt contains "
            f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt.",
            "input_tokens",
            count,
        )
    max_new = window - prompt if requested is None else min(window - prompt, requested)
    if max_new < 1:  # a prompt that fills the window leaves max_tokens 0
        raise refuse(f"max_tokens must be at least 1, got {max_new}.", "max_tokens", max_new)
    return Admission(model, max_new, priority)


def _legacy_max_tokens(refuse: Callable[..., ApiError], limit: int, prompt: int, requested: int | None) -> int:
    """Before 0.12 (as the emulator modelled 0.11): prompt + max_tokens over the window is refused."""
    if prompt >= limit:
        raise refuse(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{prompt} input tokens. Please reduce the length of the input messages.",
            None,
        )
    if requested is None:
        return limit - prompt
    if requested < 1:
        raise refuse(f"max_tokens must be at least 1, got {requested}.", "max_tokens")
    if prompt + requested > limit:
        raise refuse(
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's maximum "
            f"context length is {limit} tokens and your request has {prompt} input tokens "
            f"({requested} > {limit} - {prompt}).",
            "max_tokens",
        )
    return requested


def _served_model(instance: Instance, requested: str | None) -> str:
    served = instance.config.model
    if not requested or requested == served or requested in instance.lora_adapters:
        return requested or served
    if current_rules(instance):
        message, param = f"The model `{requested}` does not exist. Valid aliases: {served}.", "model"
    else:
        message, param = f"The model `{requested}` does not exist.", None
    body = vllm_error(404, message, "NotFoundError", param, legacy=instance.config.legacy_errors)
    raise ApiError(404, body)


def orca_header(request: web.Request, instance: Instance) -> dict[str, str] | None:
    """The ORCA load report a request asks for with ``endpoint-load-metrics-format: TEXT|JSON``.

    Read from the engine's own gauges (in their registration order); without stats logging the
    gauges do not exist and the report is empty."""
    wanted = request.headers.get(ORCA_FORMAT_HEADER, "").lower()
    if wanted not in ("text", "json"):
        return None
    engine = instance.engine
    named: list[tuple[str, float]] = []
    if not instance.config.disable_log_stats:
        named = [("num_requests_waiting", float(len(engine.waiting))), ("kv_cache_usage_perc", float(engine.kv.usage))]
    if wanted == "text":
        return {ORCA_HEADER: "TEXT " + ", ".join(f"named_metrics.{name}={value}" for name, value in named)}
    return {ORCA_HEADER: "JSON " + json.dumps({"named_metrics": dict(named)})}


def _dialect(instance: Instance) -> Dialect:
    return Dialect(
        name="vllm",
        error=partial(vllm_error, legacy=instance.config.legacy_errors),
        admit=partial(_admit, instance),
        decode_error=partial(_decode_error, instance),
        usage=partial(_usage, instance),
        extra_choice_fields={"stop_reason": None},
        reply_headers=orca_header,
    )


def _model_card(instance: Instance, name: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": unix_now(),
        "owned_by": "vllm",
        "root": instance.lora_adapters.get(name, name),
        "parent": parent,
        "max_model_len": None if parent else instance.max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": unix_now(),
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def build_app(instance: Instance) -> web.Application:
    app = new_app(instance)
    dialect = _dialect(instance)

    def error(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> ApiError:
        return ApiError(status, dialect.error(status, message, type_, param))

    def bad(message: str) -> ApiError:
        return error(400, message)

    async def models(request: web.Request) -> web.Response:
        return await openai_routes.models_list(instance, partial(_model_card, instance))

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if instance.healthy else 503)

    async def version(request: web.Request) -> web.Response:
        return json_response({"version": instance.version_string})

    async def metrics(request: web.Request) -> web.Response:  # still served with --disable-log-stats
        return web.Response(
            body=render_metrics(instance), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def tokenize_route(request: web.Request) -> web.Response:
        body = await json_object(request, bad)
        if isinstance(body.get("messages"), list):
            text = render_chat(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise error(400, "Either 'prompt' or 'messages' is required.", param="prompt")
        ids = token_ids(text)
        strs = tokenize(text) if body.get("return_token_strs") else None
        return json_response(
            {"count": len(ids), "max_model_len": instance.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(request: web.Request) -> web.Response:
        body = await json_object(request, bad)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < VOCAB_SIZE for t in tokens):
            raise error(400, "'tokens' must be a list of token ids.", param="tokens")
        # Ids are hashes, not a vocabulary: detokenising renders a placeholder per id.
        return json_response({"prompt": "".join(f"<{t}>" for t in tokens)})

    async def load_lora(request: web.Request) -> web.Response:
        body = await json_object(request, bad)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in instance.lora_adapters:
            raise error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        instance.lora_adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request: web.Request) -> web.Response:
        body = await json_object(request, bad)
        name = body.get("lora_name")
        if name not in instance.lora_adapters:
            raise error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del instance.lora_adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def sleep(request: web.Request) -> web.Response:
        current = current_rules(instance)
        levels = (0, 1, 2) if current else (1, 2)
        mode = request.query.get("mode", "abort") if current else "keep"
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            level = -1
        if not current and level not in levels:
            raise error(400, "level must be 1 or 2", param="level")
        bad = "level" if level not in levels else "mode" if mode not in ("abort", "wait", "keep") else None
        if bad is not None:  # FastAPI query validation -> 400 in vLLM's validation-error shape
            entry = {"type": "invalid", "loc": f"query.{bad}", "msg": "level: 0-2; mode: abort, wait or keep"}
            raise error(400, f"1 validation error:\n  {entry}", "Bad Request", f"query.{bad}")
        await instance.sleep(level, mode)
        if not current:
            return web.Response(status=200)
        return json_response({"status": "sleeping", "level": level})

    async def wake_up(request: web.Request) -> web.Response:
        tags = request.query.getall("tags", []) or None
        awake = await instance.wake_up(tags)
        if not current_rules(instance):
            return web.Response(status=200)
        return json_response({"status": "awake" if awake else "sleeping", "tags": tags})

    async def is_sleeping(request: web.Request) -> web.Response:
        return json_response({"is_sleeping": instance.engine.sleeping})

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        instance.engine.reset_prefix_cache()
        return web.Response(status=200)

    openai_routes.add_routes(app, dialect)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/load_lora_adapter", load_lora)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    return app
