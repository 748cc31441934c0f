"""Hostile and random requests for the proxy, shared by tests/test_fuzz.py and bench/fuzz.py.

Hypothesis strategies build whole HTTP requests (method, path, headers, framing, body): valid
OpenAI bodies, almost valid ones (one field dropped or of the wrong type), huge values, deep
nesting, long prompts, garbage and invalid UTF-8, odd and illegal headers. ``Client`` sends them
as raw bytes over one keep-alive socket (no client library smoothing them over) and ``check``
says what is wrong with an answer: a 5xx, a 4xx that is not an OpenAI error, a hang.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httptools
from hypothesis import strategies as st

from sloproxy.auth import hash_key
from sloproxy.processes import EmulatorProcess, ProxyProcess

MODELS = ("m-vllm", "m-tgi", "m-sglang")
ENGINES = {"m-vllm": "vllm", "m-tgi": "tgi", "m-sglang": "sglang"}
CASE_TIMEOUT_S = 10.0  # an answer slower than this is a hang (valid cases take milliseconds)
MAX_BODY_BYTES = 256 * 1024  # the fuzzed proxy's limit: large enough for every generator but the oversize one

# ----- the fleet and proxy under fuzzing --------------------------------------------------------


def start_fleet() -> EmulatorProcess:
    instances = [
        {"name": engine, "engine": engine, "model": model, "max_model_len": 4096} for model, engine in ENGINES.items()
    ]
    return EmulatorProcess(instances, speedup=50.0)


def proxy_config(fleet: EmulatorProcess) -> dict[str, Any]:
    backends = [
        {"name": engine, "engine": engine, "url": fleet.url(engine), "models": [model]}
        for model, engine in ENGINES.items()
    ]
    return {
        "backends": backends,
        "policy": {"name": "least-load"},
        "limits": {"max_body_bytes": MAX_BODY_BYTES, "receive_timeout_s": 5.0, "max_prompt_chars": 100_000},
        # The admin routes are fuzzed without the key (401 every time); the OpenAI routes stay open.
        "admin": {"api_keys": [hash_key("sk-fuzz-admin-key")]},
    }


def start_proxy(fleet: EmulatorProcess) -> ProxyProcess:
    return ProxyProcess(proxy_config(fleet))


# ----- generated requests --------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool = False
    label: str = ""  # which generator made it (for reports)
    model: str | None = None
    close_after: bool = False  # the framing may be ambiguous (a header value holding CRLFs): reconnect after

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: fuzz"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            mid = len(self.body) // 2
            parts = [p for p in (self.body[:mid], self.body[mid:]) if p]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(self.body)}")
            payload = self.body
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values of a type the field does not take (integral floats excluded: JSON Schema calls 2.0 an integer).
wrong_types = st.one_of(
    st.text(max_size=10), st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=3)
)
huge_ints = st.one_of(st.integers(10**6, 10**30), st.integers(-(10**30), 0))

content_parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
        st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text(max_size=20)})}
        ),
    ),
    min_size=1,
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant"]),
            "content": st.one_of(st.text(max_size=60), content_parts),
        }
    ),
    min_size=1,
    max_size=4,
).map(lambda ms: [*ms[:-1], {**ms[-1], "role": "user"}])
prompts = st.one_of(
    st.text(max_size=80),
    st.lists(st.text(max_size=20), min_size=1, max_size=3),
    st.lists(st.integers(1, 30000), min_size=1, max_size=8),
)

common_optional = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(1, 4),
    "n": st.integers(1, 2),
    "priority": st.integers(-5, 5),
    "temperature": st.floats(0, 2),
    "ignore_eos": st.booleans(),
    "top_p": st.floats(0.1, 1),  # unknown to the proxy: passes through
    "user": st.text(max_size=10),
}


def _valid(kind: str, model: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    required = {"model": model, "messages": messages} if kind == "chat" else {"model": model, "prompt": prompts}
    return st.fixed_dictionaries(required, optional=common_optional).map(lambda body: {"max_tokens": 4, **body})


served = st.sampled_from(MODELS)
any_model = st.one_of(served, served, served, st.text(max_size=12))
kinds = st.sampled_from(["chat", "completions"])
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[str, str, bytes, str | None]:
    """(kind, label, body bytes, model) for the two POST routes: valid, almost valid, hostile."""
    kind = draw(kinds)
    body = draw(_valid(kind, any_model))
    label = draw(
        st.sampled_from(
            ["valid", "valid", "valid", "drop", "wrong_type", "huge", "extra", "deep", "long_prompt", "not_object"]
        )
    )
    if label == "drop":
        del body[draw(st.sampled_from(sorted(body)))]
    elif label == "wrong_type":
        body[draw(st.sampled_from(sorted(body)))] = draw(wrong_types)
    elif label == "huge":
        name = draw(st.sampled_from(["n", "max_tokens", "max_completion_tokens", "priority", "temperature"]))
        body[name] = draw(huge_ints) if name != "temperature" else draw(st.floats(-1e300, 1e300))
    elif label == "extra":
        body.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
    elif label == "deep":
        depth = draw(st.one_of(st.integers(1, 80), st.integers(80, 5000)))
        where = draw(st.sampled_from(["content", "extra", "prompt"]))
        nested = "[" * depth + "]" * depth
        raw = json.dumps(body)
        if where == "content" and kind == "chat":
            raw = raw.replace('"messages": [', f'"messages": [{{"role": "user", "content": [{nested}]}}, ', 1)
        elif where == "prompt" and kind == "completions":
            raw = raw.replace('"prompt": ', f'"prompt": [{nested}], "x_prompt": ', 1)
        else:
            raw = raw[:-1] + f', "metadata": {nested}}}'
        return kind, label, raw.encode(), body.get("model")
    elif label == "long_prompt":
        size = draw(st.sampled_from([50_000, 99_000, 101_000, 200_000]))
        text = "lorem ipsum " * (size // 12 + 1)
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": text[:size]}]
        else:
            body["prompt"] = text[:size]
    elif label == "not_object":
        return kind, label, json.dumps(draw(json_values)).encode(), None
    model = body.get("model")
    return kind, label, json.dumps(body).encode(), model if isinstance(model, str) else None


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, str, bytes, str | None]:
    """Bodies that are not JSON, or not UTF-8, or cut short, or over the size limit."""
    kind = draw(kinds)
    valid = json.dumps(draw(_valid(kind, served))).encode()
    label = draw(st.sampled_from(["garbage", "truncated", "bad_utf8", "empty", "oversize"]))
    if label == "garbage":
        return kind, label, draw(st.binary(max_size=200)), None
    if label == "truncated":
        return kind, label, valid[: draw(st.integers(0, max(0, len(valid) - 1)))], None
    if label == "bad_utf8":
        at = draw(st.integers(0, len(valid)))
        return (
            kind,
            label,
            valid[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + valid[at:],
            None,
        )
    if label == "empty":
        return kind, label, b"", None
    return kind, label, valid + b" " * MAX_BODY_BYTES, None


header_names = st.sampled_from(
    ["x-slo-class", "x-request-id", "x-tenant", "content-type", "authorization", "accept", "x-custom", "traceparent"]
)
legal_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
header_sets = st.lists(
    st.tuples(header_names, st.one_of(legal_values, st.sampled_from(["interactive", "batch", "nope"]))), max_size=4
)


OTHER_PATHS = ["/", "/v1", "/v1/chat", "/admin", "/v1/completions/x", "/%00", "/v1/models", "/admin/fleet"]
OTHER_PATHS += ["/admin/policy", "/admin/drain", "/admin/undrain", "/admin/reload"]  # no key: 401 (or 405)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One whole request: mostly the POST routes with generated bodies, sometimes anything else."""
    headers = [("Content-Type", "application/json"), *draw(header_sets)]
    route = draw(st.sampled_from(["post"] * 8 + ["get", "other", "bad_header", "many_headers"]))
    chunked = draw(st.booleans())
    if route == "get":
        path = draw(st.sampled_from(["/v1/models", "/health", "/ready", "/metrics", "/openapi.json"]))
        return Case("GET", path, headers, b"", label="get")
    if route == "other":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"]))
        path = draw(st.sampled_from(OTHER_PATHS))
        return Case(method, path + draw(st.sampled_from(["", "?a=1", "?%ff"])), headers, b"{}", chunked, "other")
    kind, label, body, model = draw(st.one_of(json_bodies(), json_bodies(), json_bodies(), raw_bodies()))
    if route == "bad_header":  # CR, LF or NUL inside a value: the parser refuses it (400)
        evil = draw(st.sampled_from(["a\rb", "a\nSet-Cookie: x=1", "a\x00b", "a\r\n\r\nGET / HTTP/1.1"]))
        headers.append((draw(header_names), evil))
        label = "bad_header"
        return Case("POST", PATHS[kind], headers, body, chunked, label, model, close_after=True)
    elif route == "many_headers":
        headers += [(f"x-h{i}", "v") for i in range(draw(st.integers(90, 400)))]
        label = "many_headers"
    return Case("POST", PATHS[kind], headers, body, chunked, label, model)


# ----- sending and checking -------------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    seconds: float = 0.0
    complete: bool = False
    keep_alive: bool = False


class _Reader:
    """httptools callbacks collecting the first response (a pipelined second one is ignored)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.chunks: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.answer.complete:
            self.answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.answer.complete:
            self.answer.status = self.parser.get_status_code()
            self.answer.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.answer.complete:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.answer.complete = True


class Client:
    """One keep-alive connection to the proxy, reopened whenever the proxy closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, case: Case, timeout: float = CASE_TIMEOUT_S) -> Answer:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=timeout)
        sock = self.sock
        answer = Answer()
        reader = _Reader(answer)
        started = time.monotonic()
        try:
            sock.settimeout(timeout)
            with contextlib.suppress(OSError):  # refused early and closed: its answer may still be readable
                sock.sendall(case.encode())
            while not answer.complete:
                data = sock.recv(1 << 16)
                if not data:
                    break
                reader.parser.feed_data(data)
        except (TimeoutError, OSError, httptools.HttpParserError):
            pass
        answer.seconds = time.monotonic() - started
        answer.body = b"".join(reader.chunks)
        if case.close_after or not (answer.complete and answer.keep_alive):
            self.close()
        return answer


def _is_openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
    )


def check(case: Case, answer: Answer) -> str | None:
    """What is wrong with ``answer`` (None: nothing)."""
    if not answer.complete:
        return f"no complete answer within {CASE_TIMEOUT_S} s (after {answer.seconds:.2f} s)"
    if answer.status >= 500:
        return f"status {answer.status}: {answer.body[:300]!r}"
    if answer.status >= 400 and case.method != "HEAD" and not _is_openai_error(answer.body):
        return f"status {answer.status} without an OpenAI error body: {answer.body[:300]!r}"
    for name, value in answer.headers:
        if any(c in name + value for c in (b"\r", b"\n", b"\x00")) or name.lower() == b"set-cookie":
            return f"response header {name!r}: {value!r}"
    if answer.status == 200 and case.method == "POST" and not answer.body:
        return "200 with an empty body"
    return None


@dataclass
class Tally:
    """What a run saw: cases, statuses, labels, failures, the slowest case."""

    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    slowest: str = ""

    def add(self, case: Case, answer: Answer, problem: str | None) -> None:
        self.cases += 1
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        self.labels[case.label] = self.labels.get(case.label, 0) + 1
        if answer.seconds > self.slowest_s:
            self.slowest_s, self.slowest = answer.seconds, f"{case.label} {case.method} {case.path} -> {answer.status}"
        if problem is not None:
            self.failures.append(describe(case, problem))


def describe(case: Case, problem: str) -> str:
    return f"[{case.label}] {case.method} {case.path}: {problem}\n  request: {case.encode()[:400]!r}"
