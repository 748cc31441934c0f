"""Evaluation metrics shared by ``eval``, the training report and online validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau

BUCKET_EDGES = np.array([64, 128, 256, 512, 1024])  # buckets 0-63, 64-127, 128-255, 256-511, 512-1023, >=1024
MIN_ROWS_PER_MODEL = 20


def _tau(pred: np.ndarray, true: np.ndarray) -> float:
    """Kendall's tau-b; a constant prediction carries no ranking information, so it scores 0."""
    if len(pred) < 2 or np.all(pred == pred[0]) or np.all(true == true[0]):
        return 0.0
    value = kendalltau(pred, true).statistic
    return 0.0 if np.isnan(value) else float(value)


def bucket(tokens: np.ndarray) -> np.ndarray:
    return np.searchsorted(BUCKET_EDGES, np.asarray(tokens), side="right")


def evaluate(p50: np.ndarray, p90: np.ndarray, true: np.ndarray, models: Sequence[str]) -> dict[str, float]:
    """The figures the issue asks for; ``kendall_tau_within_model`` averages models with >= 20 rows."""
    p50, p90, true = (np.asarray(a, dtype=np.float64) for a in (p50, p90, true))
    names = np.asarray(models)
    within = []
    for m in np.unique(names):
        mask = names == m
        if mask.sum() >= MIN_ROWS_PER_MODEL:
            within.append(_tau(p50[mask], true[mask]))
    return {
        "rows": len(true),
        "kendall_tau": _tau(p50, true),
        "kendall_tau_within_model": float(np.mean(within)) if within else float("nan"),
        "models_within": len(within),
        "mae": float(np.mean(np.abs(p50 - true))) if len(true) else float("nan"),
        "p90_coverage": float(np.mean(true <= p90)) if len(true) else float("nan"),
        "bucket_accuracy": float(np.mean(bucket(p50) == bucket(true))) if len(true) else float("nan"),
    }


def pinball(pred_log: np.ndarray, true_log: np.ndarray, alpha: float) -> float:
    """Quantile loss on the log scale: the common yardstick for comparing two candidate models."""
    diff = np.asarray(true_log) - np.asarray(pred_log)
    return float(np.mean(np.maximum(alpha * diff, (alpha - 1) * diff))) if len(diff) else float("nan")
