"""Event-loop lag while the online learner retrains (in a worker process) under simulated traffic.

Records live samples from the shared AlpacaEval lengths through the packaged predictor, then runs
one retrain while the loop keeps serving predictions; a 5 ms timer measures how late the loop runs.
Usage: .venv/bin/python bench/predictor_online.py [--samples 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from sloproxy.loop_lag import LoopLagMonitor
from sloproxy.predictor.data import load_lengths
from sloproxy.predictor.online import OnlineLearner
from sloproxy.predictor.serving import LengthPredictor

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lengths"


async def run(samples: int) -> dict:
    rows = load_lengths(DATA / "alpaca_eval_prompts.jsonl", DATA / "alpaca_eval_lengths.csv")
    order = np.random.default_rng(0).permutation(len(rows))[:samples]
    learner = OnlineLearner(LengthPredictor.load(), capacity=samples, interval_s=None, min_samples=100)
    t0 = time.perf_counter()
    for i in order:
        pred = learner.predict_request(rows.texts[rows.prompt[i]], rows.model[i], None)
        learner.record(pred, int(rows.output_tokens[i]))
    record_s = time.perf_counter() - t0

    monitor = LoopLagMonitor(interval=0.005)
    monitor.start()
    await asyncio.sleep(0.5)
    idle = monitor.summary()
    monitor.reset()
    served = 0

    async def traffic() -> None:  # keep the loop busy with the request-path work meanwhile
        nonlocal served
        while True:
            i = order[served % len(order)]
            learner.predict_request(rows.texts[rows.prompt[i]], rows.model[i], None)
            served += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(traffic())
    t0 = time.perf_counter()
    result = await learner.retrain_now()
    retrain_s = time.perf_counter() - t0
    during = monitor.summary()
    task.cancel()
    await monitor.stop()
    await learner.stop()
    return {
        "samples": samples,
        "predict_and_record_us_per_request": round(record_s / samples * 1e6, 1),
        "retrain_seconds": round(retrain_s, 2),
        "requests_served_during_retrain": served,
        "loop_lag_idle_ms": idle,
        "loop_lag_during_retrain_ms": during,
        "verdict": result,
        "metrics": learner.metrics(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(run(args.samples))
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
