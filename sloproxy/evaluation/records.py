"""Run records: what one replay (or one simulation) measured, request by request.

A run file is JSONL: a :class:`RunMeta` line first, then one :class:`RequestRecord` per request.
The live replayer and the simulator both write it and the report reads only it, so a live run
and a simulated run compare column by column. Every time is in trace seconds (a replay at
speedup K has already multiplied its wall-clock measurements by K).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ..slo import DEFAULT_CLASSES

STATUSES = ("ok", "rejected", "error", "timeout")


class RunMeta(msgspec.Struct, tag_field="type", tag="meta", kw_only=True):
    label: str
    source: str  # "replay" or "simulate"
    workload: str
    target: str | None
    speedup: float
    duration_s: float  # workload span in trace seconds (what goodput divides by)
    slo_classes: dict[str, dict[str, Any]]  # name -> {"ttft_s", "tpot_s", "deadline_s"}, None = unbounded
    started_at: str
    extra: dict[str, Any] = {}


class RequestRecord(msgspec.Struct, tag_field="type", tag="request", kw_only=True):
    id: str
    model: str
    slo_class: str
    arrival_s: float
    status: str  # one of STATUSES
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    expected_output_tokens: int | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RunMeta | RequestRecord)


def default_slo_classes() -> dict[str, dict[str, Any]]:
    """The evaluation's default classes (``sloproxy.slo.DEFAULT_CLASSES``) in run-record form."""
    return {c.name: {"ttft_s": c.ttft_s, "tpot_s": c.tpot_s, "deadline_s": c.deadline_s} for c in DEFAULT_CLASSES}


def run_classes(meta: RunMeta) -> dict[str, dict[str, Any]]:
    """The classes a run was judged by: its own, or the defaults when it recorded none."""
    return meta.slo_classes or default_slo_classes()


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """Mean time per output token after the first; None for replies of fewer than two tokens."""
    if e2e_s is None or ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def slo_met(record: RequestRecord, classes: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a request met its class's SLO (EVALUATION.md).

    Only an ``ok`` request can meet it. Each bound the class sets must hold: TTFT, mean TPOT
    (skipped for replies of one token, which have none) and the end-to-end deadline. A class
    with no bounds, or a class the mapping does not know, is met by any ``ok`` request.
    """
    if record.status != "ok":
        return False
    bounds = classes.get(record.slo_class) or {}
    ttft_bound, tpot_bound, deadline = bounds.get("ttft_s"), bounds.get("tpot_s"), bounds.get("deadline_s")
    if ttft_bound is not None and (record.ttft_s is None or record.ttft_s > ttft_bound):
        return False
    if tpot_bound is not None and record.tpot_s is not None and record.tpot_s > tpot_bound:
        return False
    return not (deadline is not None and (record.e2e_s is None or record.e2e_s > deadline))


def write_run(path: str | Path, meta: RunMeta, records: Iterable[RequestRecord]) -> None:
    """Write a run file: the meta line, then one record per line."""
    with open(path, "wb") as handle:
        handle.write(_encoder.encode(meta) + b"\n")
        for record in records:
            handle.write(_encoder.encode(record) + b"\n")


def read_run(path: str | Path) -> tuple[RunMeta, list[RequestRecord]]:
    """Read a run file; the first non-empty line must be the meta."""
    meta: RunMeta | None = None
    records: list[RequestRecord] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = _decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{number}: not a run record ({exc})") from None
            if isinstance(item, RunMeta):
                if meta is not None:
                    raise ValueError(f"{path}:{number}: a second meta line")
                meta = item
            elif meta is None:
                raise ValueError(f"{path}:{number}: a run file starts with its meta line")
            else:
                if item.status not in STATUSES:
                    raise ValueError(f"{path}:{number}: unknown status {item.status!r}")
                records.append(item)
    if meta is None:
        raise ValueError(f"{path}: empty run file")
    return meta, records
