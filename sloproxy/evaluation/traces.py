"""Arrival traces: the shared Azure 2023 CSVs and the Mooncake JSONL, read into one row type."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec


class TraceRow(msgspec.Struct, frozen=True):
    t_s: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # Mooncake prompt-block hashes (shared prefixes), empty elsewhere


def load_trace(path: str | Path) -> list[TraceRow]:
    """Read an Azure CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or a Mooncake JSONL, sorted by time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} not found")
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    if first.lstrip().startswith("{"):
        rows = _mooncake(path)
    elif "TIMESTAMP" in first:
        rows = _azure(path)
    else:
        raise ValueError(f"{path}: not an Azure trace CSV (TIMESTAMP header) nor a Mooncake JSONL")
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r.t_s)
    start = rows[0].t_s
    return [TraceRow(r.t_s - start, r.input_tokens, r.output_tokens, r.hash_ids) for r in rows]


def _azure(path: Path) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):
            try:
                stamp = datetime.fromisoformat(row["TIMESTAMP"].strip()).replace(tzinfo=UTC).timestamp()
                rows.append(TraceRow(stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad Azure trace row ({exc})") from None
    return rows


def _mooncake(path: Path) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows.append(
                    TraceRow(
                        float(item["timestamp"]) / 1000.0,
                        int(item["input_length"]),
                        int(item["output_length"]),
                        tuple(int(h) for h in item.get("hash_ids") or ()),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad Mooncake trace row ({exc})") from None
    return rows
