"""Event-loop lag monitor: how late a periodic timer fires tells how busy the loop is.

Used by the emulator (and later the proxy) to prove it keeps up: a loop that is never late
by more than a few milliseconds is serving every request on time.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np


class LoopLagMonitor:
    def __init__(self, interval: float = 0.01, keep: int = 200_000) -> None:
        self.interval = interval
        self._samples = np.zeros(keep, dtype=np.float64)
        self._count = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reset(self) -> None:
        self._count = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = loop.time() - expected
            self._samples[self._count % len(self._samples)] = max(lag, 0.0)
            self._count += 1

    def summary(self) -> dict[str, float]:
        """Lag percentiles in milliseconds over the samples kept since the last reset."""
        n = min(self._count, len(self._samples))
        if n == 0:
            return {"samples": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        values = self._samples[:n] * 1e3
        return {
            "samples": n,
            "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max()),
        }
