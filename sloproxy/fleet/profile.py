"""The profile of one serving instance (a model on a GPU type): a measured latency grid and its capacity at an SLO.

The profilers fill it (``profiler.py`` over live HTTP, ``emulated.py`` in the emulator's virtual time); the
planner reads the capacity. One grid serves every SLO class: the capacity is re-derived from the cells for
the class a plan is made for, so a profile is measured once.

Capacity at an SLO, per prompt size: the highest measured concurrency C* such that every cell up to it
keeps the class's p90 bounds (TTFT, TPOT, E2E), and the closed-loop throughput there. Throughput comes from
Little's law (C* / mean E2E), which is exact for a closed loop in steady state and needs no wall-clock window.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path

import msgspec

from ..slo import DEFAULT_CLASSES, SLOClass

PROFILE_VERSION = 1


class Cell(msgspec.Struct, kw_only=True):
    """One point of the grid: closed-loop ``concurrency`` with prompts of ``prompt_tokens``."""

    concurrency: int
    prompt_tokens: int  # nominal prompt size sent (the rendered prompt, as engines count it)
    output_tokens: int  # max_tokens sent with ignore_eos: every reply has this length
    requests: int  # measured requests (each client's first, the ramp-up, is left out)
    errors: int
    mean_prompt_tokens: float  # as the engine reported (usage)
    mean_output_tokens: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_mean_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_mean_s: float | None
    e2e_p90_s: float | None
    e2e_mean_s: float | None
    throughput_rps: float  # concurrency / mean E2E (Little's law)
    output_tokens_per_s: float


class SloTarget(msgspec.Struct, kw_only=True):
    """The bounds a cell's p90s are held to (``None``: unbounded)."""

    name: str
    ttft_s: float | None = None
    tpot_s: float | None = None
    deadline_s: float | None = None

    @classmethod
    def of(cls, slo: SLOClass) -> SloTarget:
        return cls(name=slo.name, ttft_s=slo.ttft_s, tpot_s=slo.tpot_s, deadline_s=slo.deadline_s)

    def met_by(self, cell: Cell) -> bool:
        """A cell meets the target when it had no errors and every bounded p90 is within its bound."""
        if cell.errors or not cell.requests:
            return False
        checks = ((self.ttft_s, cell.ttft_p90_s), (self.tpot_s, cell.tpot_p90_s), (self.deadline_s, cell.e2e_p90_s))
        return all(bound is None or (value is not None and value <= bound) for bound, value in checks)


def slo_target(name: str) -> SloTarget:
    """A default SLO class (``sloproxy.slo.DEFAULT_CLASSES``) by name."""
    for slo in DEFAULT_CLASSES:
        if slo.name == name:
            return SloTarget.of(slo)
    known = ", ".join(c.name for c in DEFAULT_CLASSES)
    raise ValueError(f"unknown SLO class {name!r} (known: {known})")


INTERACTIVE = slo_target("interactive")


class SloCapacity(msgspec.Struct, kw_only=True):
    """What one instance sustains within an SLO at one prompt size (concurrency 0: not even one request)."""

    prompt_tokens: int
    concurrency: int
    throughput_rps: float
    output_tokens_per_s: float
    ttft_mean_s: float | None
    tpot_mean_s: float | None


class Capacity(msgspec.Struct, frozen=True):
    """An instance's capacity for a demand mix: requests/s (for its mean reply length) and output tokens/s."""

    rps: float
    output_tps: float


class Calibration(msgspec.Struct, kw_only=True):
    """A simulated derating of the profile's SLO capacity for one workload's mix (``calibrate.py``)."""

    factor: float  # the planner multiplies capacity by this (for plans of class ``slo``)
    target: float  # attainment each calibration interval had to reach
    slo: str
    workload: str | None = None
    interval_s: float | None = None  # the demand measurement the factor was fitted with
    window_s: float | None = None
    intervals: int = 0
    needed: list[float] = msgspec.field(default_factory=list)  # instances by the profile, per interval
    smallest: list[int] = msgspec.field(default_factory=list)  # fewest that met the target, per interval
    calibrated_at: str | None = None


class InstanceProfile(msgspec.Struct, kw_only=True):
    """What the profilers write and the planner reads (YAML or JSON; ``version`` guards the format)."""

    version: int = PROFILE_VERSION
    model: str  # the served model name (the workload's ``model``)
    engine: str  # vllm | tgi | sglang | openai
    gpu_type: str
    gpus_per_instance: int = 1
    cost_per_gpu_hour: float = 1.0
    deployment: str | None = None  # Kubernetes Deployment name (default: engine-model-gpu)
    source: str = "live"  # live | emulated
    target: str | None = None  # URL profiled, or the emulator profile name
    time_scale: float = 1.0  # measured wall times were multiplied by this (the emulator's speedup)
    measured_at: str | None = None
    slo: SloTarget = msgspec.field(default_factory=lambda: INTERACTIVE)
    cells: list[Cell] = msgspec.field(default_factory=list)
    capacity: list[SloCapacity] = msgspec.field(default_factory=list)  # derived for ``slo``
    calibration: Calibration | None = None  # optional: ``sloproxy calibrate``

    def derating(self, slo: SloTarget) -> float:
        """The calibrated capacity factor for plans of ``slo`` (1 without a calibration for that class)."""
        if self.calibration is None or self.calibration.slo != slo.name:
            return 1.0
        return self.calibration.factor

    @property
    def instance_cost_per_hour(self) -> float:
        return self.cost_per_gpu_hour * self.gpus_per_instance

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.gpu_type

    def capacity_for(self, slo: SloTarget) -> list[SloCapacity]:
        """The capacity table for another SLO (the cells are the same; only the bounds change)."""
        return derive_capacity(self.cells, slo)

    def capacity_at(self, prompt_tokens: float, table: list[SloCapacity] | None = None) -> Capacity:
        """Capacity for requests of ``prompt_tokens`` on average: requests/s and output tokens/s as
        measured at C*. The two bind in turn: replies longer than profiled hit the
        tokens/s bound; shorter ones are held to the profiled requests/s, which is conservative (a
        request's prefill is paid whatever its reply, and the profile does not separate the two costs).
        Between profiled prompt sizes both are interpolated linearly in log(prompt); below the smallest
        the smallest's figures hold (shorter prompts cost less); above the largest they shrink in
        proportion to the prompt (prefill grows at least linearly).
        """
        table = self.capacity if table is None else table
        points = sorted((c.prompt_tokens, (c.throughput_rps, c.output_tokens_per_s)) for c in table)
        if not points:
            return Capacity(0.0, 0.0)
        sizes = [p for p, _ in points]
        prompt = max(float(prompt_tokens), 1.0)
        if prompt <= sizes[0]:
            rps, tps = points[0][1]
        elif prompt >= sizes[-1]:
            rps, tps = points[-1][1]
            shrink = sizes[-1] / prompt
            rps, tps = rps * shrink, tps * shrink
        else:
            i = bisect.bisect_right(sizes, prompt)
            (p0, (r0, t0)), (p1, (r1, t1)) = points[i - 1], points[i]
            w = (math.log(prompt) - math.log(p0)) / (math.log(p1) - math.log(p0))
            rps, tps = r0 + w * (r1 - r0), t0 + w * (t1 - t0)
        return Capacity(rps, tps)


def derive_capacity(cells: list[Cell], slo: SloTarget) -> list[SloCapacity]:
    """Per prompt size: the highest concurrency whose cells, and every lower one's, meet ``slo``."""
    by_prompt: dict[int, list[Cell]] = {}
    for cell in cells:
        by_prompt.setdefault(cell.prompt_tokens, []).append(cell)
    table: list[SloCapacity] = []
    for prompt in sorted(by_prompt):
        best: Cell | None = None
        for cell in sorted(by_prompt[prompt], key=lambda c: c.concurrency):
            if not slo.met_by(cell):
                break
            best = cell
        table.append(
            SloCapacity(
                prompt_tokens=prompt,
                concurrency=best.concurrency if best else 0,
                throughput_rps=best.throughput_rps if best else 0.0,
                output_tokens_per_s=best.output_tokens_per_s if best else 0.0,
                ttft_mean_s=best.ttft_mean_s if best else None,
                tpot_mean_s=best.tpot_mean_s if best else None,
            )
        )
    return table


def default_deployment(profile: InstanceProfile) -> str:
    """A Kubernetes-safe Deployment name: engine-model-gpu, lower case, [a-z0-9-]."""
    raw = f"{profile.engine}-{profile.model}-{profile.gpu_type}".lower()
    name = "".join(ch if ch.isalnum() else "-" for ch in raw)
    while "--" in name:
        name = name.replace("--", "-")
    return name.strip("-")[:63]


def save_profile(path: str | Path, profile: InstanceProfile) -> None:
    """JSON when the name ends in .json, else YAML."""
    data = msgspec.json.format(msgspec.json.encode(profile), indent=2) if str(path).endswith(".json") else None
    if data is None:
        data = msgspec.yaml.encode(profile)
    Path(path).write_bytes(data)


def load_profile(path: str | Path) -> InstanceProfile:
    """Read a profile; a wrong version or shape is a ValueError naming the file."""
    raw = Path(path).read_bytes()
    try:
        loaded = msgspec.json.decode(raw) if str(path).endswith(".json") else msgspec.yaml.decode(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a profile ({exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a profile")
    if loaded.get("version") != PROFILE_VERSION:
        raise ValueError(f"{path}: profile version {loaded.get('version')!r}, this sloproxy reads {PROFILE_VERSION}")
    try:
        return msgspec.convert(loaded, InstanceProfile)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None
