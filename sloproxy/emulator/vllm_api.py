"""vLLM's OpenAI-compatible server surface (V1 engine), per shared/docs/ENGINE_APIS.md."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from aiohttp import web

from . import openai_routes
from .http_common import ApiError, json_object, json_response, new_app, unix_now
from .instance import Instance
from .metrics_text import render_metrics
from .openai_routes import Dialect
from .tokens import VOCAB_SIZE, render_chat, token_ids, tokenize

VLLM_VERSION = "0.11.0"


def vllm_error(status: int, message: str, type_: str, param: str | None, *, legacy: bool = False) -> dict:
    if legacy:
        return {"object": "error", "message": message, "type": type_, "param": param, "code": status}
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _dialect(instance: Instance) -> Dialect:
    return Dialect(
        name="vllm",
        error=partial(vllm_error, legacy=instance.config.legacy_errors),
        empty_stream_options_enable_usage=True,
        extra_choice_fields={"stop_reason": None},
        check_priority=True,
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
        return json_response({"version": VLLM_VERSION})

    async def metrics(request: web.Request) -> web.Response:
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
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            raise error(400, "level must be 1 or 2", param="level") from None
        if level not in (1, 2):
            raise error(400, "level must be 1 or 2", param="level")
        await instance.sleep(level)
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        await instance.wake_up()
        return web.Response(status=200)

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
