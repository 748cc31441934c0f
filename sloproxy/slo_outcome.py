"""Did a request meet its SLO? One rule, judged once when a request ends, from measured values.

:func:`judge` is the rule. It takes only numbers (the class's targets, how the request ended, its TTFT,
TPOT and end-to-end time, whether it streamed, its length), so the live proxy and the offline reports
apply the same rule to what they measured: :func:`slo_met` adapts a live :class:`ProxyRequest` (the
attainment counters on ``/metrics`` and the ``sloproxy.slo.met`` span attribute), and
``sloproxy.evaluation.records.slo_verdict`` adapts a run record (``sloproxy report``, the simulator's
sweeps). The verdict is True (met), False (missed) or None (not judged):

* **client errors are not judged.** An HTTP 4xx other than 408 and 429 says the request itself was
  wrong (400 validation, a prompt no backend's context window holds, 401/403 auth, 404 unknown model,
  413 too large, ...): no proxy could have served it on time. It is counted apart and left out of
  attainment's denominator;
* **everything else that did not end ``ok`` misses:** overload refusals (429, 503), timeouts (the
  client's, 408, 504) and failures (other 5xx, a broken connection or stream);
* an ``ok`` reply meets its class when every target the class sets holds:

  - ``deadline_s``: the reply ended within it;
  - ``ttft_s``: the first content reached the client within it. A streamed reply with no content has
    only its end (TTFT = E2E). A non-streamed reply has no first token of its own: it must be complete
    within the budget the class gives a streamed reply of its length, ``ttft_s + tpot_s * (tokens - 1)``
    (``ttft_s`` alone when ``tpot_s`` is unset or the length is unknown), and its TPOT is not judged;
  - ``tpot_s``: the mean time per output token after the first (streamed replies of two or more tokens);

  a class with no targets is met by every ``ok`` reply;
* a client that disconnected is judged only if a target had already been missed by then (a miss: past
  the deadline, or streamed and past ``ttft_s`` without, or with a late, first token); otherwise it is
  not judged: the client cut it, not the proxy. Only the live proxy sees these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import ProxyError
    from .request import ProxyRequest

# How a request ended, as the rule sees it.
OK = "ok"
CLIENT_ERROR = "client_error"  # 4xx other than 408/429: not judged, counted apart
REFUSED = "refused"  # 429, 503: the proxy (or an engine) turned it away under load
TIMEOUT = "timeout"  # the client gave up, or 408 / 504
FAILED = "failed"  # any other 5xx, a broken connection or stream, an unexpected error
DISCONNECTED = "disconnected"  # the client went away first (live only)
KINDS = (OK, CLIENT_ERROR, REFUSED, TIMEOUT, FAILED, DISCONNECTED)


def is_client_error(http_status: int | None) -> bool:
    """A 4xx that blames the request, not the service: everything but 408 (timeout) and 429 (refusal)."""
    return http_status is not None and 400 <= http_status < 500 and http_status not in (408, 429)


def status_kind(http_status: int | None) -> str:
    """The kind of an unsuccessful HTTP answer (None: no answer at all)."""
    if is_client_error(http_status):
        return CLIENT_ERROR
    if http_status in (429, 503):
        return REFUSED
    if http_status in (408, 504):
        return TIMEOUT
    return FAILED


def judge(
    kind: str,
    *,
    ttft_target: float | None,
    tpot_target: float | None,
    deadline: float | None,
    ttft_s: float | None,
    tpot_s: float | None,
    e2e_s: float | None,
    streamed: bool,
    tokens: int | None,
) -> bool | None:
    """The SLO verdict on one request: True met, False missed, None not judged (module docstring).

    ``*_target`` / ``deadline`` are the class's bounds in seconds (None: unbounded). ``ttft_s`` is arrival
    to first content (None when there was none), ``tpot_s`` the mean time per output token after the
    first (None under two tokens), ``e2e_s`` arrival to the end (for a disconnect: to the disconnect),
    ``tokens`` the reply's output tokens (None: unknown).
    """
    if kind == CLIENT_ERROR:
        return None
    if kind == DISCONNECTED:
        late = (deadline is not None and e2e_s is not None and e2e_s > deadline) or (
            ttft_target is not None
            and streamed  # a non-streamed reply's budget depends on a length nobody learnt
            and (ttft_s > ttft_target if ttft_s is not None else e2e_s is not None and e2e_s > ttft_target)
        )
        return False if late else None
    if kind != OK:
        return False
    if deadline is not None and (e2e_s is None or e2e_s > deadline):
        return False
    if ttft_target is None:
        return tpot_target is None or tpot_s is None or tpot_s <= tpot_target
    if not streamed:  # the whole reply within what the class allows a streamed reply of its length
        budget = ttft_target + (tpot_target or 0.0) * max((tokens or 1) - 1, 0)
        return e2e_s is not None and e2e_s <= budget
    first = ttft_s if ttft_s is not None else e2e_s  # an empty stream: its end is its first answer
    if first is None or first > ttft_target:
        return False
    return tpot_target is None or tpot_s is None or tpot_s <= tpot_target


# ----- the live adapter ---------------------------------------------------------------------------
def outcome_status(outcome: str) -> int | None:
    """The HTTP status a live outcome label stands for (``ok``: 200, ``http_<status>``), else None."""
    if outcome == "ok":
        return 200
    if outcome.startswith("http_") and outcome[5:].isdigit():
        return int(outcome[5:])
    return None


def outcome_kind(outcome: str) -> str:
    """The kind of a live outcome label (``ok``, ``client_disconnected``, ``http_<status>``, ``error``)."""
    if outcome == "ok":
        return OK
    if outcome == "client_disconnected":
        return DISCONNECTED
    status = outcome_status(outcome)
    return FAILED if status is None else status_kind(status)


def time_per_output_token(request: ProxyRequest, ended: float) -> float | None:
    """Mean seconds per output token after the first (streamed replies with at least two tokens)."""
    tokens = request.completion_tokens
    if request.first_token_at is None or tokens is None or tokens < 2:
        return None
    return (ended - request.first_token_at) / (tokens - 1)


def slo_met(request: ProxyRequest, outcome: str, ended: float) -> bool | None:
    """:func:`judge` on a live request; None also when it never got a class (refused while being read)."""
    slo = request.slo
    if slo is None:
        return None
    first = request.first_token_at
    return judge(
        outcome_kind(outcome),
        ttft_target=slo.ttft_s,
        tpot_target=slo.tpot_s,
        deadline=slo.deadline_s,
        ttft_s=None if first is None else first - request.received_at,
        tpot_s=time_per_output_token(request, ended),
        e2e_s=ended - request.received_at,
        streamed=request.stream,
        tokens=request.completion_tokens,
    )


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
