"""Did a request meet its SLO? Judged once, when it ends, from its class and what it measured.

One function serves the metrics (attainment counters) and the traces (``sloproxy.slo.met``), so
both always agree. Rules:

* a class with a TTFT target: the first content must reach the client within ``ttft_s`` of arrival,
  and the mean time per output token after it must stay within ``tpot_s``. A non-streamed reply has
  no first token of its own: it meets the class when it ends within the budget the class allows for a
  reply of its length (``ttft_s + tpot_s * (tokens - 1)``);
* a class with an end-to-end ``deadline_s``: the reply must end by it;
* a request the proxy rejected or failed misses;
* a client that disconnected is judged only if a target had already been missed by then (it then
  counts as a miss); otherwise it is not judged, since the client cut it, not the proxy.
"""

from __future__ import annotations

from .errors import ProxyError
from .request import ProxyRequest


def time_per_output_token(request: ProxyRequest, ended: float) -> float | None:
    """Mean seconds per output token after the first (streamed replies with at least two tokens)."""
    tokens = request.completion_tokens
    if request.first_token_at is None or tokens is None or tokens < 2:
        return None
    return (ended - request.first_token_at) / (tokens - 1)


def slo_met(request: ProxyRequest, outcome: str, ended: float) -> bool | None:
    """True / False, or None when the request is not judged (no class, or an abandoned reply on time)."""
    slo = request.slo
    if slo is None:
        return None
    elapsed = ended - request.received_at
    if outcome == "client_disconnected":
        late = (slo.deadline_s is not None and elapsed > slo.deadline_s) or (
            slo.ttft_s is not None and request.first_token_at is None and elapsed > slo.ttft_s
        )
        return False if late else None
    if outcome != "ok":
        return False
    if slo.deadline_s is not None and elapsed > slo.deadline_s:
        return False
    if slo.ttft_s is None:
        return True
    if request.first_token_at is None:  # not streamed: the whole reply within the class's budget for its length
        return elapsed <= slo.ttft_s + (slo.tpot_s or 0.0) * max((request.completion_tokens or 1) - 1, 0)
    if request.first_token_at - request.received_at > slo.ttft_s:
        return False
    tpot = time_per_output_token(request, ended)
    return slo.tpot_s is None or tpot is None or tpot <= slo.tpot_s


def rejected_in_queue(request: ProxyRequest) -> bool:
    """The request's last ``scheduler.acquire`` ended without a backend (shed, queue full, timed out,
    nothing healthy): forward.py stamps ``queued_at`` before it and ``dispatched_at`` after it."""
    queued = request.queued_at
    return queued is not None and (request.dispatched_at is None or request.dispatched_at < queued)


def was_rejected(request: ProxyRequest | None) -> bool:
    """Refused by the proxy itself (invalid, unclassifiable, or turned away by the scheduler),
    as opposed to failed by an engine after dispatch."""
    return request is None or request.slo is None or rejected_in_queue(request)


def rejection_reason(error: ProxyError) -> str:
    """A short, bounded reason for a refused request (metric label and span attribute)."""
    if error.code:
        return error.code
    return {400: "invalid_request", 404: "not_found", 413: "body_too_large", 503: "no_backend"}.get(
        error.status, f"http_{error.status}"
    )
