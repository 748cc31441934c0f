"""Per-model length statistics: how verbose each served model is, with a global prior for unknown ones."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

STAT_NAMES: tuple[str, ...] = ("m_mean", "m_std", "m_q10", "m_q50", "m_q90", "m_log_n")
PRIOR_WEIGHT = 20.0  # an unknown or rarely seen model borrows this many rows' worth of the global prior


def _stats(logs: np.ndarray) -> list[float]:
    return [
        float(logs.mean()),
        float(logs.std()),
        float(np.quantile(logs, 0.1)),
        float(np.quantile(logs, 0.5)),
        float(np.quantile(logs, 0.9)),
        math.log1p(len(logs)),
    ]


def _shrink(own: list[float], prior: list[float], n: int) -> list[float]:
    """Blend a model's stats toward the prior by sample size (a model seen 3 times is mostly prior)."""
    w = n / (n + PRIOR_WEIGHT)
    return [w * a + (1 - w) * b for a, b in zip(own[:-1], prior[:-1], strict=True)] + [math.log1p(n)]


def compute(models: Sequence[str], tokens: np.ndarray) -> tuple[dict[str, dict], dict]:
    """Table ``model -> {stats, median, p90}`` (raw-token median and p90 feed the baseline) and the prior."""
    logs = np.log1p(np.asarray(tokens, dtype=np.float64))
    raw = np.asarray(tokens, dtype=np.float64)
    names = np.asarray(models)
    prior = {
        "stats": _stats(logs) if len(logs) else [0.0] * len(STAT_NAMES),
        "median": float(np.median(raw)) if len(raw) else 256.0,
        "p90": float(np.quantile(raw, 0.9)) if len(raw) else 1024.0,
    }
    table: dict[str, dict] = {}
    order = np.argsort(names, kind="stable")
    sorted_names = names[order]
    bounds = np.flatnonzero(np.r_[True, sorted_names[1:] != sorted_names[:-1], True])
    for a, b in itertools.pairwise(bounds):
        idx = order[a:b]
        table[str(sorted_names[a])] = {
            "stats": _shrink(_stats(logs[idx]), prior["stats"], len(idx)),
            "median": float(np.median(raw[idx])),
            "p90": float(np.quantile(raw[idx], 0.9)),
        }
    return table, prior


def lookup(table: dict[str, dict], prior: dict, model: str) -> dict:
    """The model's entry, or the global prior when the model was never seen."""
    return table.get(model) or prior
