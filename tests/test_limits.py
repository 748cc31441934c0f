"""The pieces behind hostile-input handling, in process: nesting scan, config checks, OpenAPI, header safety."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sloproxy.body_limits import nesting_exceeds
from sloproxy.config import ConfigError, Limits, parse_config
from sloproxy.errors import ProxyError
from sloproxy.http_server import HTTPServer, Request, Response, _header_line
from sloproxy.openapi import document
from sloproxy.request import parse_request
from tests.fuzzing import json_bodies

BACKENDS = [{"name": "v", "engine": "vllm", "url": "http://127.0.0.1:1", "models": ["m"]}]


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\ab\n', max_size=12)
documents = st.recursive(
    st.one_of(st.none(), st.integers(), tricky_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(tricky_text, inner, max_size=3)),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(documents, st.integers(0, 12))
def test_nesting_scan_matches_the_true_depth(value, limit):
    raw = json.dumps(value).encode()
    assert nesting_exceeds(raw, limit) == (depth(value) > limit)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"max_n": 0}, "max_n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_json_depth": 600}, "max_json_depth"),
        ({"max_json_depth": 2}, "max_json_depth"),
        ({"max_headers": 1}, "max_headers"),
        ({"max_prompt_chars": 0}, "max_prompt_chars"),
        ({"receive_timeout_s": 0}, "receive_timeout_s"),
        ({"send_timeout_s": -1}, "send_timeout_s"),
        ({"max_n": "many"}, "max_n"),
    ],
)
def test_limits_are_validated_and_errors_name_the_field(limits, field):
    with pytest.raises(ConfigError, match=f"limits.{field}"):
        parse_config({"backends": BACKENDS, "limits": limits})


def test_response_headers_never_carry_control_characters():
    assert _header_line("X-Id", "a\r\nSet-Cookie: x=1") == b"X-Id: aSet-Cookie: x=1\r\n"
    assert _header_line("X-Id", "caf\u00e9 \u20ac") == b"X-Id: caf\xe9 ?\r\n"
    assert _header_line("Retry-After", "2") == b"Retry-After: 2\r\n"


def test_openapi_document_lists_the_routes_and_valid_schemas():
    doc = document(Limits())
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(
        doc["paths"]
    )
    assert not any(path.startswith("/admin") for path in doc["paths"])
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "408", "413", "429", "503"} <= set(responses)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert document(Limits(), {"/admin/x": {}})["paths"]["/admin/x"] == {}


@settings(max_examples=500, deadline=None)
@given(json_bodies())
def test_openapi_request_schemas_accept_exactly_what_the_proxy_validates(generated):
    """The published schema and parse_request agree on every generated body (within the size limits)."""
    kind, label, raw, _ = generated
    if label in ("deep", "long_prompt"):  # limits the schema states in words only
        return
    doc = document(Limits())
    name = "ChatCompletionRequest" if kind == "chat" else "CompletionRequest"
    validator = jsonschema.Draft202012Validator({"components": doc["components"], **doc["components"]["schemas"][name]})
    schema_ok = validator.is_valid(json.loads(raw))
    try:
        parse_request(kind, raw)
        proxy_ok = True
    except ProxyError:
        proxy_ok = False
    assert schema_ok == proxy_ok, raw[:300]


async def test_a_client_that_stops_reading_is_disconnected_after_the_send_timeout():
    server = HTTPServer(max_body_bytes=1000, send_timeout_s=1.0)
    cancelled = asyncio.Event()

    async def endless(request: Request, response: Response) -> None:
        response.start(200, "application/octet-stream")
        try:
            while True:
                await response.write(b"x" * 65536)
        except (asyncio.CancelledError, ConnectionResetError):
            cancelled.set()
            raise

    server.route("GET", "/endless", endless)
    await server.start("127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        await asyncio.wait_for(cancelled.wait(), 6.0)  # send timeout 1 s + the sweeper's second + margin
        writer.close()
    finally:
        await server.stop(grace_s=0.5)
