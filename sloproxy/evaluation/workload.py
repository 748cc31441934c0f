"""The workload file: one request per JSONL line, the input both the replayer and the simulator read.

The same file is also a lengths file for the engine emulator (``sloproxy emulate --lengths W.jsonl``):
every line carries ``messages`` and the true ``output_tokens``, and every request's rendered prompt
is unique within a workload, so the emulator's prompt-keyed table gives each request its own length.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec


class WorkloadRequest(msgspec.Struct, kw_only=True):
    id: str  # "r000042"
    arrival_s: float  # seconds from the workload start, rate scaling applied; the file is sorted by it
    model: str  # fleet model name
    slo_class: str
    messages: list[dict[str, Any]]
    max_tokens: int | None  # what the client sends (None: omitted), never derived from the true length
    output_tokens: int  # the true reply length (only the emulator may read it)
    prompt_tokens: int  # the trace's input size the prompt was padded to
    generator: str  # the real model whose reply lengths stand in for this fleet model
    prompt_id: str | None
    tenant: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkloadRequest)


def write_workload(path: str | Path, requests: Iterable[WorkloadRequest]) -> None:
    """Write one request per line (msgspec field order, so equal inputs give equal bytes)."""
    with open(path, "wb") as handle:
        for request in requests:
            handle.write(_encoder.encode(request) + b"\n")


def read_workload(path: str | Path) -> list[WorkloadRequest]:
    """Read a workload file; raises ValueError naming the first bad line."""
    requests: list[WorkloadRequest] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                requests.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{number}: not a workload request ({exc})") from None
    return requests


def client_body(request: WorkloadRequest) -> bytes:
    """The JSON body a client sends for ``request`` (streamed, usage asked for): the replay sends it and
    the simulator parses it, so both see the same request."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    return msgspec.json.encode(body)
