"""The proxy's OpenAPI 3.1 document, served on ``GET /openapi.json``.

Why: clients and fuzzers (tests/test_fuzz.py, bench/fuzz.py) read what the proxy accepts from one
place. The request schemas mirror what ``request.parse_request`` validates (typed fields, the
configured limits on ``n`` and reply tokens); every other field is allowed and passes through to
the engine unchanged. The document is built once per server, so serving it costs one write.

Routes of other modules (e.g. an admin API) join through ``document(limits, extra_paths=...)``:
``paths()`` returns only the public OpenAI, health and metrics routes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .config import Limits
from .http_server import Handler, Request, Response

INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}

ERROR_STATUSES = {
    "400": "Invalid request: malformed JSON or HTTP, a field of the wrong type, a value over a limit "
    "(`n`, `max_tokens`, prompt characters, nesting depth), an unknown SLO class.",
    "401": "Missing or unknown API key (when keys are configured).",
    "403": "The key may not use this model, or the admin API is disabled (no admin key configured).",
    "404": "Unknown model (`code: model_not_found`) or route.",
    "405": "Method not allowed on this route (the `Allow` header lists the methods).",
    "408": "The request did not arrive whole within the receive timeout.",
    "409": "Admin reload: the proxy was not started from a config file.",
    "413": "The body is larger than the configured limit.",
    "429": "Shed or rate limited; `Retry-After` says when to retry.",
    "431": "The request head is too large or has too many header lines.",
    "502": "The backend failed or sent something the proxy could not read.",
    "503": "No healthy backend serves the model, or the proxy is shutting down; `Retry-After` is set.",
    "504": "The backend timed out.",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _generation_fields(limits: Limits) -> dict[str, Any]:
    """Fields both OpenAI routes validate (everything else passes through to the engine)."""
    tokens = {"type": "integer", "minimum": 1, "maximum": limits.max_tokens}
    return {
        "model": {"type": "string", "description": "A model some backend serves (GET /v1/models)."},
        "stream": {"type": "boolean", "default": False},
        "stream_options": _nullable(
            {
                "type": "object",
                "properties": {"include_usage": _nullable({"type": "boolean"})},
                "additionalProperties": True,
            }
        ),
        "max_tokens": _nullable(tokens),
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n, "default": 1},
        "priority": _nullable({"type": "integer", **INT64, "description": "Lower runs earlier, within the band."}),
        "temperature": _nullable({"type": "number"}),
        "ignore_eos": {"type": "boolean", "default": False, "description": "vLLM/SGLang/TGI extension."},
    }


def _request_note(limits: Limits) -> str:
    return (
        f"Bodies up to {limits.max_body_bytes} bytes, nested at most {limits.max_json_depth} levels, "
        f"with prompts up to {limits.max_prompt_chars} characters. Unknown fields pass through to the engine."
    )


def schemas(limits: Limits) -> dict[str, Any]:
    """``components.schemas``: the two request bodies, the error, and the replies' outlines."""
    fields = _generation_fields(limits)
    tokens = fields["max_tokens"]
    content = _nullable(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {}, "description": "Content parts."}]}
    )
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"type": "string"}, "content": content},
        "additionalProperties": True,
    }
    prompt_item = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]}
    return {
        "ChatCompletionRequest": {
            "type": "object",
            "description": _request_note(limits),
            "required": ["model", "messages"],
            "properties": {
                **fields,
                "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}},
                "max_completion_tokens": tokens,
            },
            "additionalProperties": True,
        },
        "CompletionRequest": {
            "type": "object",
            "description": _request_note(limits),
            "required": ["model", "prompt"],
            "properties": {
                **fields,
                "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": prompt_item}]},
            },
            "additionalProperties": True,
        },
        "Message": message,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "ChatCompletion": _reply_outline("chat.completion"),
        "Completion": _reply_outline("text_completion"),
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "max_model_len": {
                    "type": ["integer", "null"],
                    "description": "The largest context window among the model's backends (null: none known yet).",
                },
            },
        },
        "Ready": {
            "type": "object",
            "required": ["ready", "healthy_backends"],
            "properties": {
                "ready": {"type": "boolean"},
                "healthy_backends": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _reply_outline(kind: str) -> dict[str, Any]:
    """The engine's reply as relayed: only its outline is promised (engines add fields)."""
    return {
        "type": "object",
        "required": ["object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _nullable({"type": "object"}),
        },
        "additionalProperties": True,
    }


def _errors(*statuses: str) -> dict[str, Any]:
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {status: {"description": ERROR_STATUSES[status], "content": ref} for status in statuses}


def _generation(summary: str, request: str, reply: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
            },
            "parameters": [
                {"name": "x-slo-class", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "x-tenant", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {
                    "description": "The engine's reply; with `stream: true`, server-sent events ending in `[DONE]`.",
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{reply}"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors("400", "401", "403", "404", "405", "408", "413", "429", "431", "502", "503", "504"),
            },
        }
    }


def _get(summary: str, ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors("405", "408", "431", *errors)}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def paths() -> dict[str, Any]:
    """The proxy's public routes (admin routes are added by their own module)."""
    ready = {"$ref": "#/components/schemas/Ready"}
    return {
        "/v1/chat/completions": _generation("Chat completion (OpenAI API)", "ChatCompletionRequest", "ChatCompletion"),
        "/v1/completions": _generation("Text completion (OpenAI API)", "CompletionRequest", "Completion"),
        "/v1/models": _get(
            "Models served",
            _json(
                "Every model some backend serves (that the caller's tenant may use).",
                {"$ref": "#/components/schemas/ModelList"},
            ),
            "401",
        ),
        "/v1/models/{model}": {
            "get": {
                "summary": "One model (OpenAI API)",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": _json("The model, if some backend serves it.", {"$ref": "#/components/schemas/Model"}),
                    **_errors("401", "404", "405", "408", "431"),
                },
            }
        },
        "/health": _get("Liveness", _json("The proxy runs.", {"type": "object"})),
        "/ready": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": _json("At least one backend is healthy.", ready),
                    "503": _json("No backend is healthy.", ready),
                    **_errors("405", "408", "431"),
                },
            }
        },
        "/metrics": _get(
            "Prometheus metrics",
            {"description": "Text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
        ),
        "/openapi.json": _get("This document", _json("OpenAPI 3.1.", {"type": "object"})),
    }


def admin_paths() -> dict[str, Any]:
    """The admin API (admin.py): every route needs the admin key."""
    backend = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["backend"],
                    "properties": {"backend": {"type": "string"}},
                    "additionalProperties": False,
                }
            }
        },
    }
    state = _json("The backend's state after the change.", {"type": "object"})

    def post(summary: str, ok: dict[str, Any], body: dict[str, Any] | None, *errors: str) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "security": [{"adminKey": []}],
            "responses": {"200": ok, **_errors("401", "403", "405", "408", "431", *errors)},
        }
        if body is not None:
            operation["requestBody"] = body
        return {"post": operation}

    def get(summary: str, description: str) -> dict[str, Any]:
        operation = _get(summary, _json(description, {"type": "object"}), "401", "403")
        operation["get"]["security"] = [{"adminKey": []}]
        return operation

    return {
        "/admin/fleet": get("Fleet state", "Backends (health, draining, load, budgets), queue depths, counters."),
        "/admin/policy": get("The policy in force", "Its name, parameters and whether it queues."),
        "/admin/drain": post("Drain a backend: no new requests", state, backend, "400", "404"),
        "/admin/undrain": post("Bring a drained backend back", state, backend, "400", "404"),
        "/admin/reload": post(
            "Re-read the config file; apply its live sections",
            _json("What was applied and what needs a restart.", {"type": "object"}),
            None,
            "400",
            "409",
        ),
    }


def document(limits: Limits, extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document for a proxy running with ``limits``."""
    from . import __version__

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sloproxy",
            "version": __version__,
            "description": "SLO-aware proxy in front of LLM engines (OpenAI-compatible). Every error body "
            "has the OpenAI shape `{error: {message, type, param, code}}`.",
        },
        "paths": {**paths(), **(extra_paths or {})},
        "components": {
            "schemas": schemas(limits),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "A tenant's API key."},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "The admin key."},
            },
        },
        "security": [{"apiKey": []}, {}],  # a key where tenants have keys; none in open mode
    }


def route(limits: Limits, extra_paths: dict[str, Any] | None = None) -> Handler:
    """A ``GET /openapi.json`` handler serving the document, encoded once."""
    body = msgspec.json.encode(document(limits, extra_paths))

    async def openapi(request: Request, response: Response) -> None:
        response.send(200, body)

    return openapi
