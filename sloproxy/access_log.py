"""The access log: one JSON line per finished request, for operators (opt-in: ``access_log.enabled``).

What happened to each request, in numbers an operator can grep and join with the engines' logs (the
request id is the one sent to the engine as ``X-Request-Id``): who (tenant), what (model, class), where
(backend, attempts), how it ended (HTTP status, outcome, whether it met its SLO) and how long it took.
Never a key, a prompt or a reply: only sizes and times. Lines go to a file (appended, flushed per line)
or to standard output.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import msgspec

from .errors import ProxyError
from .request import ProxyRequest
from .slo_outcome import outcome_status


class AccessLog:
    def __init__(self, path: str | None) -> None:
        self._out: IO[str] = open(path, "a", encoding="utf-8", buffering=1) if path else sys.stdout  # noqa: SIM115
        self._owned = path is not None
        self._encode = msgspec.json.Encoder().encode

    def close(self) -> None:
        if self._owned:
            self._out.close()

    def write(
        self,
        request: ProxyRequest | None,
        outcome: str,
        error: BaseException | None,
        met: bool | None,
        ended: float,
        started: float,
    ) -> None:
        status = error.status if isinstance(error, ProxyError) else outcome_status(outcome)
        line: dict[str, Any] = {
            "time": round(time.time(), 3),
            "id": None,
            "status": status,
            "outcome": outcome,
            "slo_met": met,
            "e2e_s": round(ended - started, 4),
        }
        if request is not None:
            first = request.first_token_at
            line.update(
                id=request.id,
                client_request_id=request.client_request_id,
                tenant=request.tenant,
                model=request.model,
                slo_class=request.slo.name if request.slo is not None else None,
                backend=request.backend,
                attempts=request.attempts,
                stream=request.stream,
                queue_s=round(request.queue_wait_s, 4),
                ttft_s=None if first is None else round(first - request.received_at, 4),
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                max_tokens_clamped_to=request.clamped_to,
            )
        if isinstance(error, ProxyError):
            line["error_code"] = error.code
        self._out.write(self._encode(line).decode() + "\n")
