"""Profile the emulator's performance model in virtual time: the same grid, no HTTP, no waiting.

Runs the protocol of ``profiler.py`` (closed loop per cell, unique prompts, fixed reply length, each
client's first request left out) against one :class:`~sloproxy.emulator.engine.Engine`, so a planner
can be given profiles of GPU types nobody has at hand, consistent with what ``sloproxy simulate`` runs.
A live profile of an emulated instance measures the same model plus the HTTP path (a few ms).
"""

from __future__ import annotations

from ..emulator.engine import Engine, Sequence
from ..emulator.profiles import get_profile
from ..emulator.virtual import make_sequence, step_until_done
from .measure import Sample, finish_profile, summarize_cell, walk_grid
from .profile import INTERACTIVE, Cell, InstanceProfile, SloTarget


def measure_cell(
    engine_kind: str, profile_name: str, concurrency: int, prompt_tokens: int, output_tokens: int, rounds: int = 4
) -> Cell:
    """``concurrency`` closed-loop clients, ``rounds`` requests each, on a fresh engine."""
    if rounds < 2:
        raise ValueError("rounds must be at least 2 (the first one is warm-up)")
    engine = Engine(engine_kind, get_profile(profile_name))
    now = 0.0
    left = dict.fromkeys(range(concurrency), rounds)
    owner: dict[int, int] = {}
    in_flight: list[Sequence] = []
    samples: list[Sample] = []

    def issue(client: int, at: float) -> None:
        seq = make_sequence(engine, prompt_tokens, output_tokens, at)
        engine.add(seq)
        owner[id(seq)] = client
        in_flight.append(seq)
        left[client] -= 1

    def finished(seq: Sequence, now: float) -> None:
        client = owner.pop(id(seq))
        if left[client] < rounds - 1:  # not the client's first request
            samples.append(
                Sample(
                    ttft_s=seq.token_times[0] - seq.arrival,
                    e2e_s=(seq.finished_at or now) - seq.arrival,
                    prompt_tokens=seq.prompt_len,
                    output_tokens=seq.output,
                )
            )
        if left[client] > 0:
            issue(client, now)

    for client in range(concurrency):
        issue(client, now)
    step_until_done(engine, in_flight, now, finished)
    return summarize_cell(concurrency, prompt_tokens, output_tokens, samples, 0)


async def profile_emulated(
    profile_name: str,
    model: str,
    concurrencies: list[int],
    prompt_sizes: list[int],
    *,
    engine_kind: str = "vllm",
    output_tokens: int = 128,
    rounds: int = 4,
    slo: SloTarget = INTERACTIVE,
    cost_per_gpu_hour: float = 1.0,
    deployment: str | None = None,
    full_grid: bool = False,
) -> InstanceProfile:
    """A profile of emulator profile ``profile_name`` (its GPU type and tensor-parallel width carried over)."""
    spec = get_profile(profile_name)

    async def measure(concurrency: int, prompt: int) -> Cell:
        return measure_cell(engine_kind, profile_name, concurrency, prompt, output_tokens, rounds)

    cells = await walk_grid(measure, concurrencies, prompt_sizes, slo, full_grid=full_grid)
    profile = InstanceProfile(
        model=model,
        engine=engine_kind,
        gpu_type=spec.gpu.name,
        gpus_per_instance=spec.tensor_parallel,
        cost_per_gpu_hour=cost_per_gpu_hour,
        deployment=deployment,
        source="emulated",
        target=profile_name,
        slo=slo,
    )
    return finish_profile(profile, cells)
