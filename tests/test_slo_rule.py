"""One definition of "met": the live proxy (slo_outcome.slo_met on a ProxyRequest) and the offline report
(records.slo_verdict on a run record) give the same verdict on the same measurements, case by case.

Every case is measured once (class, how it ended, TTFT, E2E, tokens, streamed or not) and turned into both
a live request and a run record the way the proxy and the replayer would see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sloproxy.evaluation.records import RequestRecord, outcome, slo_met, slo_verdict, tpot
from sloproxy.request import parse_request
from sloproxy.slo import SLOClass
from sloproxy.slo_outcome import (
    CLIENT_ERROR,
    FAILED,
    OK,
    REFUSED,
    TIMEOUT,
    is_client_error,
    outcome_kind,
    status_kind,
)
from sloproxy.slo_outcome import slo_met as live_slo_met

INTERACTIVE = SLOClass("interactive", ttft_s=1.0, tpot_s=0.1)
BATCH = SLOClass("batch", deadline_s=10.0, band=1, sheddable=True)
FREE = SLOClass("free")
CLASSES = {
    c.name: {"ttft_s": c.ttft_s, "tpot_s": c.tpot_s, "deadline_s": c.deadline_s} for c in (INTERACTIVE, BATCH, FREE)
}
ARRIVAL = 100.0


@dataclass(frozen=True)
class Case:
    name: str
    slo: SLOClass
    live: str  # the live outcome label (app.py)
    status: str  # the run record's status
    http_status: int | None
    ttft: float | None  # arrival to first content (None: none)
    e2e: float  # arrival to the end
    tokens: int | None
    streamed: bool
    expected: bool | None


CASES = [
    # answered, streamed
    Case("on time", INTERACTIVE, "ok", "ok", 200, 0.9, 1.8, 11, True, True),
    Case("slow tokens", INTERACTIVE, "ok", "ok", 200, 0.9, 2.2, 11, True, False),
    Case("late first token", INTERACTIVE, "ok", "ok", 200, 1.1, 1.5, 5, True, False),
    Case("one token: no TPOT", INTERACTIVE, "ok", "ok", 200, 0.5, 0.5, 1, True, True),
    Case("empty stream on time", INTERACTIVE, "ok", "ok", 200, None, 0.8, 0, True, True),
    Case("empty stream late", INTERACTIVE, "ok", "ok", 200, None, 1.2, 0, True, False),
    # answered, not streamed: the whole reply within ttft + tpot * (tokens - 1) = 2.0 s for 11 tokens
    Case("non-streamed in budget", INTERACTIVE, "ok", "ok", 200, None, 1.9, 11, False, True),
    Case("non-streamed over budget", INTERACTIVE, "ok", "ok", 200, None, 2.1, 11, False, False),
    Case("non-streamed, length unknown", INTERACTIVE, "ok", "ok", 200, None, 0.9, None, False, True),
    Case("non-streamed, length unknown, late", INTERACTIVE, "ok", "ok", 200, None, 1.5, None, False, False),
    Case("batch by the deadline", BATCH, "ok", "ok", 200, 5.0, 9.0, 100, True, True),
    Case("batch past the deadline", BATCH, "ok", "ok", 200, 5.0, 11.0, 100, True, False),
    Case("batch non-streamed", BATCH, "ok", "ok", 200, None, 9.0, 100, False, True),
    Case("no targets", FREE, "ok", "ok", 200, 50.0, 900.0, 10, True, True),
    # overload refusals, timeouts, failures: misses
    Case("queue full", INTERACTIVE, "http_429", "rejected", 429, None, 0.01, None, True, False),
    Case("no backend", BATCH, "http_503", "rejected", 503, None, 0.01, None, True, False),
    Case("engine did not answer", INTERACTIVE, "http_504", "error", 504, None, 30.0, None, True, False),
    Case("client timeout", BATCH, "http_408", "timeout", None, None, 600.0, None, True, False),
    Case("backend failed", INTERACTIVE, "http_502", "error", 502, None, 0.3, None, True, False),
    Case("unexpected error", BATCH, "error", "error", None, None, 0.3, None, True, False),
    Case("stream broke mid-way", FREE, "http_502", "error", 200, 0.2, 3.0, None, True, False),
    # client errors: not judged
    Case("invalid body", INTERACTIVE, "http_400", "error", 400, None, 0.001, None, True, None),
    Case("prompt fits no backend", BATCH, "http_400", "error", 400, None, 0.002, None, True, None),
    Case("bad key", INTERACTIVE, "http_401", "error", 401, None, 0.001, None, True, None),
    Case("model not allowed", INTERACTIVE, "http_403", "error", 403, None, 0.001, None, False, None),
    Case("unknown model", FREE, "http_404", "error", 404, None, 0.001, None, True, None),
    Case("body too large", BATCH, "http_413", "error", 413, None, 0.001, None, True, None),
]


def live_request(case: Case):
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    request.classify(case.slo.name, case.slo)
    request.stream = case.streamed
    request.received_at = ARRIVAL
    request.completion_tokens = case.tokens
    request.first_token_at = None if case.ttft is None else ARRIVAL + case.ttft
    return request


def run_record(case: Case) -> RequestRecord:
    ok = case.status == "ok"
    return RequestRecord(
        id=case.name,
        model="m",
        slo_class=case.slo.name,
        arrival_s=0.0,
        status=case.status,
        http_status=case.http_status,
        ttft_s=case.ttft,
        tpot_s=tpot(case.e2e, case.ttft, case.tokens) if ok else None,
        e2e_s=case.e2e if ok else None,
        output_tokens=case.tokens,
        stream=case.streamed,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_live_and_offline_agree(case: Case) -> None:
    live = live_slo_met(live_request(case), case.live, ARRIVAL + case.e2e)
    offline = slo_verdict(run_record(case), CLASSES)
    assert live is offline is case.expected
    assert slo_met(run_record(case), CLASSES) is (case.expected is True)  # the bool form: judged and met


def test_how_requests_ended() -> None:
    assert [is_client_error(s) for s in (400, 401, 403, 404, 413, 422, 408, 429, 500, 503, None)] == [
        *([True] * 6),
        *([False] * 5),
    ]
    assert [status_kind(s) for s in (404, 429, 503, 408, 504, 500, 502, None)] == [
        CLIENT_ERROR,
        REFUSED,
        REFUSED,
        TIMEOUT,
        TIMEOUT,
        FAILED,
        FAILED,
        FAILED,
    ]
    assert outcome_kind("ok") == OK and outcome_kind("error") == FAILED and outcome_kind("http_400") == CLIENT_ERROR
    kinds = {c.name: outcome(run_record(c)) for c in CASES}
    assert kinds["queue full"] == REFUSED and kinds["client timeout"] == TIMEOUT
    assert kinds["stream broke mid-way"] == FAILED and kinds["unknown model"] == CLIENT_ERROR


def test_disconnects_are_judged_only_once_already_late() -> None:
    """Only the live proxy sees a client leave: a miss if a target had passed, else not judged."""
    streamed = live_request(Case("", INTERACTIVE, "", "", None, None, 0.0, None, True, None))
    assert live_slo_met(streamed, "client_disconnected", ARRIVAL + 0.5) is None
    assert live_slo_met(streamed, "client_disconnected", ARRIVAL + 1.5) is False  # no first token after 1.5 s
    streamed.first_token_at = ARRIVAL + 0.4
    assert live_slo_met(streamed, "client_disconnected", ARRIVAL + 5.0) is None  # first token on time
    streamed.first_token_at = ARRIVAL + 1.2
    assert live_slo_met(streamed, "client_disconnected", ARRIVAL + 1.3) is False  # first token late
    plain = live_request(Case("", INTERACTIVE, "", "", None, None, 0.0, None, False, None))
    assert live_slo_met(plain, "client_disconnected", ARRIVAL + 1.5) is None  # its budget depends on its length
    batch = live_request(Case("", BATCH, "", "", None, None, 0.0, None, True, None))
    assert live_slo_met(batch, "client_disconnected", ARRIVAL + 11.0) is False


def test_unclassified_requests_are_not_judged() -> None:
    request = parse_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    assert live_slo_met(request, "ok", 1.0) is None
