"""Fuzzing the proxy over real HTTP: ~1,500 generated requests, none answered with a 5xx or a hang.

Generated requests (tests/fuzzing.py) go through a proxy replica (a child process) in front of an
emulated vLLM, TGI and SGLang fleet: valid bodies (cheap: at most 4 reply tokens), almost valid
ones, huge values, deep nesting, long prompts, garbage, invalid UTF-8, odd and illegal headers.
Every answer must come within 10 s, be below 500, and be an OpenAI-format error when a 4xx.
bench/fuzz.py runs the same generators for 10,000+ cases.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.fuzzing import Case, Client, Tally, cases, check, describe, start_fleet, start_proxy

FUZZ_CASES = 1500


@pytest.fixture(scope="module")
def fuzz_proxy() -> Iterator[ProxyProcess]:
    fleet: EmulatorProcess
    with start_fleet() as fleet, start_proxy(fleet) as proxy:
        yield proxy


@pytest.mark.timeout(300)
def test_fuzzed_requests_get_bounded_openai_answers(fuzz_proxy):
    client = Client("127.0.0.1", int(fuzz_proxy.url.rsplit(":", 1)[1]))
    tally = Tally()

    @settings(
        max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(cases())
    def one(case: Case) -> None:
        answer = client.send(case)
        problem = check(case, answer)
        tally.add(case, answer, problem)
        assert problem is None, describe(case, problem)

    try:
        one()
    finally:
        client.close()
    # The run exercised what it claims to: valid replies and each kind of refusal.
    assert tally.cases >= FUZZ_CASES
    assert {200, 400, 404, 413, 431} <= set(tally.statuses), tally.statuses
    assert {"valid", "deep", "huge", "long_prompt", "garbage", "bad_utf8", "bad_header"} <= set(tally.labels)
    assert tally.slowest_s < 10.0
    assert "Traceback" not in fuzz_proxy.output(), fuzz_proxy.output()[-3000:]
