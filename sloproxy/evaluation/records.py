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
from ..slo_outcome import CLIENT_ERROR, FAILED, OK, REFUSED, TIMEOUT, is_client_error, judge

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
    # What the run was, for the reader of a report (None: not recorded; files without them still read).
    trace: str | None = None  # the trace the workload was built from (file name)
    window_s: list[float] | None = None  # [start, end] of that trace kept, in trace seconds
    fleet: list[dict[str, Any]] | None = None  # one {"name", "engine", "model", "profile"} per engine instance


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
    stream: bool = True  # the client asked for a stream (the replayer and the simulator always do)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RunMeta | RequestRecord)


def fleet_record(instances: Iterable[Any]) -> list[dict[str, Any]]:
    """``RunMeta.fleet`` from fleet instances (``sloproxy.emulator.fleet.InstanceSpec``)."""
    return [{"name": i.name, "engine": i.engine, "model": i.model, "profile": i.profile} for i in instances]


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


def outcome(record: RequestRecord) -> str:
    """How the request ended, as the SLO rule sees it (``sloproxy.slo_outcome``): ``ok``, ``client_error``
    (a 4xx other than 408/429, whatever the record's status), ``refused`` (status ``rejected``: 429/503),
    ``timeout``, or ``failed`` (status ``error``: 5xx, a broken connection or stream)."""
    if record.status == "ok":
        return OK
    if is_client_error(record.http_status):
        return CLIENT_ERROR
    return {"rejected": REFUSED, "timeout": TIMEOUT}.get(record.status, FAILED)


def slo_verdict(record: RequestRecord, classes: Mapping[str, Mapping[str, Any]]) -> bool | None:
    """The one SLO rule (``sloproxy.slo_outcome.judge``) on a run record: True met, False missed,
    None not judged (a client error). A class the mapping does not know has no targets."""
    bounds = classes.get(record.slo_class) or {}
    return judge(
        outcome(record),
        ttft_target=bounds.get("ttft_s"),
        tpot_target=bounds.get("tpot_s"),
        deadline=bounds.get("deadline_s"),
        ttft_s=record.ttft_s,
        tpot_s=record.tpot_s,
        e2e_s=record.e2e_s,
        streamed=record.stream,
        tokens=record.output_tokens,
    )


def slo_met(record: RequestRecord, classes: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the request was judged and met its SLO (:func:`slo_verdict` is True). Attainment divides
    the count of these by the judged requests, i.e. without client errors (report.py)."""
    return slo_verdict(record, classes) is True


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
