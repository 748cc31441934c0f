"""Calibration benchmark: emulated figures next to measured or published ones.

Three sources, each with its tolerance:

* the H200 measurements in ``shared/data/calibration`` (decode step over a batch x context
  grid, batch-1 prefill): the per-iteration time model, within ±15%;
* a public A100 40 GB report (Llama-3.1-8B, vLLM, ``--random-input-len 1024
  --random-output-len 128 --ignore-eos``, closed loop at fixed concurrency): 75 tok/s single
  stream and 6.6x that throughput at 8 streams, within ±25%;
* public H100 figures for Llama-3.1-8B on vLLM: ≈ 5,300 output tok/s at saturation and
  TTFT ≈ 0.5 s at 32 concurrent requests, within ±25%. The report does not give its
  request shape, so the scenarios are stated: saturation = 1024-in / 1024-out requests
  kept at vLLM's 256-sequence limit; TTFT = mean over 32 requests (1024 in) arriving at once.

The engine-level scenarios run the real engine core in virtual time (no sockets), the same
code the HTTP emulator drives in real time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .engine import Engine
from .profiles import get_profile
from .roofline import StepShape, step_time_ms
from .virtual import closed_loop

MEASUREMENTS_FILE = Path("shared/data/calibration/h200_llama3_8b_measured.json")
# shared/ lies beside the checkout: found from this file (editable install) or from the working directory.
CANDIDATE_ROOTS = (Path(__file__).resolve().parents[3], Path.cwd().parent, Path.cwd())


@dataclass(frozen=True)
class Check:
    name: str
    unit: str
    emulated: float
    reference: float
    tolerance: float  # relative

    @property
    def error(self) -> float:
        return self.emulated / self.reference - 1.0

    @property
    def ok(self) -> bool:
        return abs(self.error) <= self.tolerance


def measurements_path() -> Path:
    override = os.environ.get("SLOPROXY_H200_MEASUREMENTS")
    if override:
        return Path(override)
    for root in CANDIDATE_ROOTS:
        if (root / MEASUREMENTS_FILE).is_file():
            return root / MEASUREMENTS_FILE
    raise FileNotFoundError(
        f"{MEASUREMENTS_FILE} not found beside the checkout; set SLOPROXY_H200_MEASUREMENTS to its path"
    )


def h200_checks(path: Path | None = None) -> list[Check]:
    data = json.loads((path or measurements_path()).read_text())
    profile = get_profile("h200-llama3-8b")
    checks: list[Check] = []
    for point in data["decode"]:
        shape = StepShape()
        for _ in range(point["batch"]):
            shape.add_decode(point["context"])
        checks.append(
            Check(
                f"h200 decode step B={point['batch']} C={point['context']}",
                "ms",
                step_time_ms(profile, shape),
                point["step_ms"],
                0.15,
            )
        )
    for point in data["prefill"]:
        shape = StepShape()
        shape.add_prefill(point["tokens"], 0)
        checks.append(
            Check(f"h200 prefill {point['tokens']} tokens", "ms", step_time_ms(profile, shape), point["ms"], 0.15)
        )
    return checks


def a100_checks() -> list[Check]:
    profile = get_profile("a100-40g-llama3-8b")
    one = closed_loop(Engine("vllm", profile), concurrency=1, requests=20, prompt_tokens=1024, output_tokens=128)
    eight = closed_loop(Engine("vllm", profile), concurrency=8, requests=160, prompt_tokens=1024, output_tokens=128)
    single_stream = 1.0 / one.mean_tpot_s
    return [
        Check("a100-40g single-stream decode", "tok/s", single_stream, 75.0, 0.25),
        Check(
            "a100-40g throughput 8 streams / 1 stream",
            "x",
            eight.output_tokens_per_s / one.output_tokens_per_s,
            6.6,
            0.25,
        ),
    ]


def h100_checks() -> list[Check]:
    profile = get_profile("h100-llama3-8b")
    saturated = closed_loop(
        Engine("vllm", profile), concurrency=256, requests=1024, prompt_tokens=1024, output_tokens=1024
    )
    burst = closed_loop(Engine("vllm", profile), concurrency=32, requests=32, prompt_tokens=1024, output_tokens=1024)
    return [
        Check("h100 saturation output throughput", "tok/s", saturated.output_tokens_per_s, 5300.0, 0.25),
        Check("h100 mean TTFT, 32 concurrent", "s", burst.mean_ttft_s, 0.5, 0.25),
    ]


def all_checks() -> list[Check]:
    return [*h200_checks(), *a100_checks(), *h100_checks()]


def main(json_output: bool = False) -> int:
    checks = all_checks()
    if json_output:
        print(json.dumps([{**asdict(c), "error": c.error, "ok": c.ok} for c in checks], indent=2))
    else:
        print(f"{'check':46} {'emulated':>10} {'reference':>10} {'unit':>6} {'error':>7}  tol   ok")
        for c in checks:
            print(
                f"{c.name:46} {c.emulated:10.2f} {c.reference:10.2f} {c.unit:>6} {c.error:+7.1%}"
                f"  ±{c.tolerance:.0%} {'yes' if c.ok else 'NO'}"
            )
        print(f"{sum(c.ok for c in checks)}/{len(checks)} within tolerance")
    return 0 if all(c.ok for c in checks) else 1
