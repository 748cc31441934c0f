"""Serving cost of the length predictor on one core: featurise + both quantile heads per request.

Prints p50/p99 per request over the shared AlpacaEval instructions (as chat messages), over
~4 KiB prompts (a typical production context), and the featurisation time of a 200k-token prompt.
Usage: .venv/bin/python bench/predictor_latency.py [--model DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from sloproxy.predictor.features import featurise
from sloproxy.predictor.serving import LengthPredictor

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lengths"


def _percentiles(samples: list[float]) -> dict[str, float]:
    us = np.asarray(samples) * 1e6
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p99_us": round(float(np.percentile(us, 99)), 1)}


def _time_requests(predictor: LengthPredictor, prompts: list, models: list[str], repeat: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(repeat):
        for prompt, model in zip(prompts, models, strict=True):
            t0 = clock()
            predictor.predict(prompt, model, max_tokens=1024, temperature=0.7, slo_class="interactive", tenant="t1")
            out.append(clock() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="artifact dir (default: packaged)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    predictor = LengthPredictor.load(args.model)
    texts = [json.loads(line)["instruction"] for line in (DATA / "alpaca_eval_prompts.jsonl").open(encoding="utf-8")]
    models = sorted(predictor.bundle.stats)[: len(texts)] or ["m"]
    models = [models[i % len(models)] for i in range(len(texts))]
    chats = [
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": t}] for t in texts
    ]
    _time_requests(predictor, chats[:50], models[:50], 1)  # warm up
    result = {"alpaca_chat": _percentiles(_time_requests(predictor, chats, models, args.repeat))}
    long_prompts = [(t + "\n") * max(1, 4096 // (len(t) + 1)) for t in texts[:200]]
    result["prompt_4KiB"] = _percentiles(_time_requests(predictor, long_prompts, models[:200], args.repeat))
    huge = ("Summarise the following log carefully. " + "lorem ipsum dolor sit amet, consectetur " * 20_000)[:800_000]
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        featurise(huge, "m", 512, None, None, None, None)
        times.append(time.perf_counter() - t0)
    result["featurise_200k_tokens"] = {"chars": len(huge), **_percentiles(times)}
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        predictor.predict([{"role": "user", "content": huge}], "m", 512)
        times.append(time.perf_counter() - t0)
    result["predict_200k_tokens"] = _percentiles(times)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
