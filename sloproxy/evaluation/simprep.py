"""A workload made ready for simulation: each request's client body and what the engine would compute from it.

The emulator tokenises every prompt when it arrives; the simulator has to know the same counts and
prefix-cache block hashes, for every request of every run of a sweep. Tokenising ~20 M prompt tokens
takes longer than simulating them, so it is done once per workload, and line by line with a cache:
a newline between two non-space characters is always a token of its own under the emulator's rule
(:mod:`sloproxy.emulator.tokens`), so such lines tokenise independently and the context lines that
workload prompts share are tokenised once.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..emulator.fleet import FleetSpec
from ..emulator.tokens import VOCAB_SIZE, block_hashes, render_chat, token_ids
from .workload import WorkloadRequest, client_body

_NEWLINE_ID = zlib.crc32(b"\n") % VOCAB_SIZE


@dataclass(slots=True)
class SimRequest:
    """One workload request as the simulator needs it (the client side and the engine side)."""

    id: str
    model: str
    slo_class: str
    tenant: str | None
    arrival_s: float
    max_tokens: int | None
    output_tokens: int  # the true reply length (the engine's, and the oracle's estimate)
    raw: bytes  # the body the replayer sends
    prompt_tokens: int  # the emulator's count of the rendered prompt
    hashes: dict[int, list[int]]  # block size -> the prompt's prefix-cache block hashes


class PromptTokens:
    """Token ids of rendered prompts, equal to :func:`token_ids`, with per-line caching."""

    def __init__(self) -> None:
        self._lines: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        lines = self._lines
        out: list[int] = []
        chunk: str | None = None
        for part in text.split("\n"):
            if chunk is None:
                chunk = part
            elif chunk and part and not chunk[-1].isspace() and not part[0].isspace():
                cached = lines.get(chunk)
                if cached is None:
                    cached = lines[chunk] = token_ids(chunk)
                out += cached
                out.append(_NEWLINE_ID)
                chunk = part
            else:  # the newline joins a whitespace run: keep the text together
                chunk = f"{chunk}\n{part}"
        if chunk:
            cached = lines.get(chunk)
            if cached is None:
                cached = lines[chunk] = token_ids(chunk)
            out += cached
        return out


def prepare(requests: Sequence[WorkloadRequest], block_sizes: Iterable[int] = (16,)) -> list[SimRequest]:
    """Every request with its body, prompt token count and block hashes, in arrival order."""
    sizes = sorted(set(block_sizes))
    tokens = PromptTokens()
    prepared: list[SimRequest] = []
    for request in sorted(requests, key=lambda r: r.arrival_s):
        ids = tokens.ids(render_chat(request.messages))
        prepared.append(
            SimRequest(
                id=request.id,
                model=request.model,
                slo_class=request.slo_class,
                tenant=request.tenant,
                arrival_s=request.arrival_s,
                max_tokens=request.max_tokens,
                output_tokens=request.output_tokens,
                raw=client_body(request),
                prompt_tokens=len(ids),
                hashes={size: block_hashes(ids, size) for size in sizes},
            )
        )
    return prepared


def load_inputs(fleet_path: str, workload_path: str) -> tuple[FleetSpec, list[SimRequest]]:
    """Read a fleet file and a workload, check that the fleet serves the workload's models, prepare it."""
    from ..emulator.fleet import load_fleet
    from ..emulator.profiles import get_profile
    from .workload import read_workload

    if not Path(fleet_path).is_file():
        raise FileNotFoundError(f"fleet file {fleet_path} does not exist")
    if not Path(workload_path).is_file():
        raise FileNotFoundError(f"workload file {workload_path} does not exist")
    fleet = load_fleet(fleet_path)
    if not fleet.instances:
        raise ValueError(f"{fleet_path}: the fleet has no instances")
    requests = read_workload(workload_path)
    if not requests:
        raise ValueError(f"{workload_path}: no requests")
    served = {spec.model for spec in fleet.instances}
    missing = sorted({r.model for r in requests} - served)
    if missing:
        served_text = ", ".join(sorted(served))
        raise ValueError(
            f"{workload_path} uses models the fleet does not serve: {', '.join(missing)} (served: {served_text})"
        )
    sizes = {get_profile(spec.profile).block_size for spec in fleet.instances}
    return fleet, prepare(requests, sizes)
