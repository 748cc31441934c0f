"""Online learning: record finished requests, retrain off the event loop, hot-swap only on improvement.

The request path pays only a deque append per finished request. Retraining runs in a worker process
(``retrain.retrain_job``); loading the accepted candidate's trees runs in a thread (LightGBM's C
parser releases the GIL); the swap itself is one attribute assignment on the loop thread, so a
request sees either the old or the new predictor, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import lightgbm as lgb
import msgspec
import numpy as np

from .columns import N_COLUMNS
from .retrain import load_boosters, retrain_job, write_payload
from .serving import LengthPredictor, PredictCall, Prediction

log = logging.getLogger(__name__)


class SampleStore:
    """Bounded ring buffer of finished requests (oldest overwritten first), preallocated numpy arrays.

    Rows are float32 (what LightGBM bins anyway), so a snapshot is one array copy and handing
    it to the retrain worker is a file write of contiguous memory, not pickling Python objects.
    """

    def __init__(self, capacity: int = 20_000, ncol: int = N_COLUMNS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.rows = np.zeros((capacity, ncol), dtype=np.float32)
        self.tokens = np.zeros(capacity, dtype=np.int64)
        self._next = 0  # slot the next sample goes to
        self._size = 0
        self.added = 0  # ever added (monotonic; "N new samples" counts from here)

    def append(self, row: list[float], output_tokens: int) -> None:
        i = self._next
        self.rows[i] = row
        self.tokens[i] = output_tokens
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        self.added += 1

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, output_tokens) copies, oldest first."""
        if self._size < self.capacity:
            return self.rows[: self._size].copy(), self.tokens[: self._size].copy()
        i = self._next
        return np.concatenate((self.rows[i:], self.rows[:i])), np.concatenate((self.tokens[i:], self.tokens[:i]))

    def __len__(self) -> int:
        return self._size


class LiveError:
    """Error of the serving model over the last ``window`` finished requests."""

    def __init__(self, window: int = 2_000) -> None:
        self._abs_log: deque[float] = deque(maxlen=window)
        self._abs_tok: deque[float] = deque(maxlen=window)
        self._covered: deque[bool] = deque(maxlen=window)

    def add(self, p50: float, p90: float, true: int) -> None:
        self._abs_log.append(abs(math.log1p(p50) - math.log1p(true)))
        self._abs_tok.append(abs(p50 - true))
        self._covered.append(true <= p90)

    def reset(self) -> None:
        self._abs_log.clear()
        self._abs_tok.clear()
        self._covered.clear()

    def figures(self) -> dict[str, float]:
        n = len(self._abs_log)
        if n == 0:
            return {
                "live_samples": 0.0,
                "live_mae_log": math.nan,
                "live_mae_tokens": math.nan,
                "live_p90_coverage": math.nan,
            }
        return {
            "live_samples": float(n),
            "live_mae_log": sum(self._abs_log) / n,
            "live_mae_tokens": sum(self._abs_tok) / n,
            "live_p90_coverage": sum(self._covered) / n,
        }


def _start_pool() -> ProcessPoolExecutor:
    """A one-worker pool, already started (spawn, not fork: a forked child of a process whose
    LightGBM OpenMP pool has run can deadlock)."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(int).result()
    return pool


TRAINER_ROLE = "predictor-trainer"


class ModelExchange(Protocol):
    """How replicas share one model (``RedisCoordinator`` is one): a leader lease for the trainer,
    and versioned model files the others fetch."""

    async def try_lead(self, role: str) -> bool: ...

    async def publish_predictor(self, version: str, files: dict[str, bytes]) -> None: ...

    async def fetch_predictor(self, known_version: str | None) -> tuple[str, dict[str, bytes]] | None: ...


class OnlineLearner:
    """Holds the current predictor, records outcomes and replaces the predictor when a retrain wins.

    ``retrain_every``: new samples that trigger a retrain; ``interval_s``: retrain on this schedule too
    (when at least ``min_samples`` are stored). ``executor``: where ``retrain_job`` runs (default: a
    one-worker process pool created on first use).
    """

    def __init__(
        self,
        predictor: LengthPredictor,
        capacity: int = 20_000,
        retrain_every: int = 5_000,
        interval_s: float | None = 3_600.0,
        min_samples: int = 500,
        holdback: float = 0.2,
        rounds: int = 50,
        min_improvement: float = 0.01,
        executor: Executor | None = None,
    ) -> None:
        self.predictor = predictor
        self.store = SampleStore(capacity)
        self.live = LiveError()
        self.retrain_every = retrain_every
        self.interval_s = interval_s
        self.min_samples = min_samples
        self.holdback = holdback
        self.rounds = rounds
        self.min_improvement = min_improvement
        self._executor = executor
        self._own_executor = executor is None
        self._trained_at_added = 0
        self._last_retrain = time.monotonic()
        self._task: asyncio.Task | None = None
        self._running: asyncio.Task | None = None
        self.counters = {"retrains": 0, "swaps": 0, "rejected": 0, "failed": 0, "generation": 0, "adopted": 0}
        self.last_result: dict[str, Any] = {}
        # Several replicas: only the lease holder retrains; it publishes what it adopts, the others
        # fetch and serve that version (their own samples stay local: they are not trained on).
        self.exchange: ModelExchange | None = None
        self.replica = ""
        self.version: str | None = None  # the shared version this replica serves (None: its own)

    # -- request path -------------------------------------------------------------------------
    def predict_request(self, *args: Any, **kwargs: Any) -> Prediction:
        """Same as ``LengthPredictor.predict_request`` on whichever predictor is current."""
        return self.predictor.predict_request(*args, **kwargs)

    def predict_many(self, calls: Sequence[PredictCall]) -> list[Prediction]:
        """Same as ``LengthPredictor.predict_many`` on whichever predictor is current."""
        return self.predictor.predict_many(calls)

    def record(self, prediction: Prediction, completion_tokens: int | None) -> None:
        """A request finished with ``completion_tokens`` (from the engine's usage); O(1)."""
        if completion_tokens is None or completion_tokens < 0:
            return
        row = prediction.row
        if row is None:  # a Prediction built elsewhere: recompute the row the heads saw
            row = self.predictor.row(prediction.features)
        self.store.append(row, int(completion_tokens))
        self.live.add(prediction.p50, prediction.p90, int(completion_tokens))

    def metrics(self) -> dict[str, float]:
        """Numbers to export as gauges/counters (live error of the serving model, retrain outcomes)."""
        out = self.live.figures()
        out["store_samples"] = float(len(self.store))
        out.update(
            {f"{k}_total" if k != "generation" else "model_generation": float(v) for k, v in self.counters.items()}
        )
        for key in ("current_loss", "candidate_loss"):
            out[f"last_{key}"] = float(self.last_result.get(key, math.nan))
        return out

    # -- background worker ----------------------------------------------------------------------
    def due(self) -> bool:
        if len(self.store) < self.min_samples or self._running is not None:
            return False
        if self.store.added - self._trained_at_added >= self.retrain_every:
            return True
        return self.interval_s is not None and time.monotonic() - self._last_retrain >= self.interval_s

    def start(self, check_every_s: float = 1.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(check_every_s), name="predictor-online")

    async def stop(self) -> None:
        for task in (self._task, self._running):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _loop(self, check_every_s: float) -> None:
        while True:
            await asyncio.sleep(check_every_s)
            if self.exchange is not None and not await self.exchange.try_lead(TRAINER_ROLE):
                with contextlib.suppress(Exception):
                    await self.adopt_shared()
                continue
            if self.due():
                self._running = asyncio.get_running_loop().create_task(self.retrain_now())
                with contextlib.suppress(Exception):
                    await self._running
                self._running = None

    async def retrain_now(self) -> dict[str, Any]:
        """Retrain on the stored samples, validate, swap if better; returns the job's verdict.

        Nothing large is pickled or copied while holding the GIL for long: the samples are one
        numpy copy on the loop thread, then (in a thread) written as ``.npy`` files next to the
        current heads (LightGBM writes those in C); the worker reads them and writes the candidate's
        heads back as files, which a thread parses (in C) before the swap.
        """
        loop = asyncio.get_running_loop()
        x, y = self.store.snapshot()  # one array copy: consistent with the ring the loop keeps writing
        self._trained_at_added = self.store.added
        self._last_retrain = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="sloproxy-retrain-")
        try:
            payload = await asyncio.to_thread(write_payload, workdir, x, y, self.predictor.bundle, self._options())
            del x, y
            if self._executor is None:
                self._executor = await asyncio.to_thread(_start_pool)  # process start-up: off the loop thread
            self.counters["retrains"] += 1
            try:
                result = await loop.run_in_executor(self._executor, retrain_job, payload)
            except Exception:
                self.counters["failed"] += 1
                log.exception("predictor retrain failed")
                raise
            self.last_result = {k: v for k, v in result.items() if k not in ("p50", "p90")}
            if result["accepted"]:
                candidate = await asyncio.to_thread(self._build, result)
                self.predictor = candidate  # the swap: one reference assignment on the loop thread
                self.live.reset()
                self.counters["swaps"] += 1
                self.counters["generation"] += 1
                if self.exchange is not None:
                    await self._publish(candidate)
            else:
                self.counters["rejected"] += 1
            return self.last_result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # a few unlinks; synchronous so cancellation cannot leak it

    async def _publish(self, predictor: LengthPredictor) -> None:
        """Share an adopted model: its heads as LightGBM text and its offsets, under a new version."""
        assert self.exchange is not None
        bundle = predictor.bundle
        files = await asyncio.to_thread(
            lambda: {
                "p50": bundle.p50.model_to_string().encode(),
                "p90": bundle.p90.model_to_string().encode(),
                "offsets": msgspec.json.encode({"offset50": bundle.offset50, "offset90": bundle.offset90}),
            }
        )
        version = f"{self.replica or 'replica'}-{self.counters['generation']}-{int(time.time())}"
        try:
            await self.exchange.publish_predictor(version, files)
            self.version = version
        except Exception:  # the next adopted model is published again; followers keep theirs meanwhile
            log.exception("publishing predictor version %s failed", version)

    async def adopt_shared(self) -> bool:
        """Serve the version the trainer published, if newer than the one served; True if swapped."""
        assert self.exchange is not None
        fetched = await self.exchange.fetch_predictor(self.version)
        if fetched is None:
            return False
        version, files = fetched
        old = self.predictor
        offsets = msgspec.json.decode(files["offsets"])

        def build() -> LengthPredictor:
            p50 = lgb.Booster(model_str=files["p50"].decode())
            p90 = lgb.Booster(model_str=files["p90"].decode())
            meta = {**old.bundle.meta, "shared_version": version}
            bundle = replace(old.bundle, p50=p50, p90=p90, meta=meta, **offsets)
            return LengthPredictor(bundle, source=f"{old.source} (shared {version})")

        self.predictor = await asyncio.to_thread(build)
        self.version = version
        self.live.reset()
        self.counters["adopted"] += 1
        log.info("predictor: serving shared version %s", version)
        return True

    def _options(self) -> dict[str, Any]:
        return {"holdback": self.holdback, "rounds": self.rounds, "min_improvement": self.min_improvement}

    def _build(self, result: dict[str, Any]) -> LengthPredictor:
        old = self.predictor.bundle
        p50, p90 = load_boosters(result)
        bundle = replace(
            old,
            p50=p50,
            p90=p90,
            offset50=result["offset50"],
            offset90=result["offset90"],
            meta={**old.meta, "online_generation": self.counters["generation"] + 1},
        )
        return LengthPredictor(bundle, source=f"{self.predictor.source} (online)")
