"""What both profilers share: per-request samples, a cell's summary, and the walk over the grid.

Kept apart from the drivers so the live profiler and the emulated one summarise identically (same
percentiles, same warm-up rule, same stop rule) and their profiles can be compared point for point.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from .profile import Cell, InstanceProfile, SloTarget, derive_capacity


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished request, times in the engine's own seconds."""

    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a one-token reply)."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(p50, p90, mean), linear interpolation as the report uses."""
    if not values:
        return None, None, None
    array = np.asarray(values, dtype=float)
    return float(np.percentile(array, 50)), float(np.percentile(array, 90)), float(array.mean())


def summarize_cell(
    concurrency: int, prompt_tokens: int, output_tokens: int, samples: Sequence[Sample], errors: int
) -> Cell:
    """A cell from its measured samples; throughput by Little's law (concurrency / mean E2E)."""
    ttft = _stats([s.ttft_s for s in samples])
    tpot = _stats([t for s in samples if (t := s.tpot_s) is not None])
    e2e = _stats([s.e2e_s for s in samples])
    mean_out = float(np.mean([s.output_tokens for s in samples])) if samples else 0.0
    rps = concurrency / e2e[2] if e2e[2] else 0.0
    return Cell(
        concurrency=concurrency,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests=len(samples),
        errors=errors,
        mean_prompt_tokens=float(np.mean([s.prompt_tokens for s in samples])) if samples else 0.0,
        mean_output_tokens=mean_out,
        ttft_p50_s=ttft[0],
        ttft_p90_s=ttft[1],
        ttft_mean_s=ttft[2],
        tpot_p50_s=tpot[0],
        tpot_p90_s=tpot[1],
        tpot_mean_s=tpot[2],
        e2e_p90_s=e2e[1],
        e2e_mean_s=e2e[2],
        throughput_rps=rps,
        output_tokens_per_s=rps * mean_out,
    )


MeasureCell = Callable[[int, int], Awaitable[Cell]]  # (concurrency, prompt tokens) -> cell


async def walk_grid(
    measure: MeasureCell,
    concurrencies: Sequence[int],
    prompt_sizes: Sequence[int],
    slo: SloTarget,
    *,
    full_grid: bool = False,
    progress: Callable[[Cell], None] | None = None,
) -> list[Cell]:
    """Measure every prompt size at rising concurrency; unless ``full_grid``, stop a prompt size at its
    second cell past the SLO (latency only grows with load, and the overloaded cells are the slowest)."""
    if not concurrencies or not prompt_sizes:
        raise ValueError("the grid needs at least one concurrency and one prompt size")
    if min(concurrencies) < 1 or min(prompt_sizes) < 1:
        raise ValueError("concurrencies and prompt sizes must be positive")
    cells: list[Cell] = []
    for prompt in sorted(set(prompt_sizes)):
        misses = 0
        for concurrency in sorted(set(concurrencies)):
            cell = await measure(concurrency, prompt)
            cells.append(cell)
            if progress is not None:
                progress(cell)
            misses += not slo.met_by(cell)
            if misses >= 2 and not full_grid:
                break
    return cells


def finish_profile(profile: InstanceProfile, cells: list[Cell]) -> InstanceProfile:
    """Attach the cells, the capacity for the profile's SLO and the time stamp."""
    profile.cells = cells
    profile.capacity = derive_capacity(cells, profile.slo)
    profile.measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    return profile
