"""Fuzz the proxy with 10,000+ generated requests (the generators of tests/test_fuzz.py).

Starts an emulated fleet (vLLM, TGI, SGLang) and a proxy replica in child processes, sends every
case over real HTTP and prints: cases run, statuses seen, failures found (5xx, a 4xx that is not
an OpenAI error, no answer within 10 s), and the slowest case. Failures do not stop the run.

    .venv/bin/python bench/fuzz.py --cases 10000 [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from tests.fuzzing import Case, Client, Tally, cases, check, start_fleet, start_proxy


def run(url: str, count: int, seed: int) -> Tally:
    client = Client("127.0.0.1", int(url.rsplit(":", 1)[1]))
    tally = Tally()

    @hypothesis_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(case: Case) -> None:
        answer = client.send(case)
        tally.add(case, answer, check(case, answer))  # recorded, never raised: the run goes on

    try:
        one()
    finally:
        client.close()
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    with start_fleet() as fleet, start_proxy(fleet) as proxy:
        tally = run(proxy.url, args.cases, args.seed)
        log = proxy.output()
    elapsed = time.monotonic() - started
    print(f"cases run:      {tally.cases} in {elapsed:.0f} s")
    print(f"statuses seen:  {dict(sorted(tally.statuses.items()))}")
    print(f"generators:     {dict(sorted(tally.labels.items()))}")
    print(f"failures found: {len(tally.failures)}")
    for failure in tally.failures[:20]:
        print("  " + failure)
    print(f"slowest case:   {tally.slowest_s * 1000:.1f} ms ({tally.slowest})")
    tracebacks = log.count("Traceback")
    print(f"proxy log tracebacks: {tracebacks}")
    return 1 if tally.failures or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
