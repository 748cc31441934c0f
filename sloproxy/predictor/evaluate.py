"""Batch prediction over rows and the ``eval`` report: the model against two baselines.

Baselines are point predictors, so their point value serves as both their p50 and their p90:
that is what a proxy using them would reserve. ``per_model_quantiles`` (the model's empirical
median and p90 from the training data) is reported as well, as the honest distributional yardstick.
"""

from __future__ import annotations

import numpy as np

from . import modelstats
from .columns import model_row
from .data import Rows
from .metrics import evaluate
from .train import Bundle, assemble, featurise_prompts


def predict_rows(bundle: Bundle, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """(p50, p90) in tokens for every row, batched (the same maths as the single-row server)."""
    feats = featurise_prompts(rows)
    cols = np.array([model_row(f, bundle.text.score(f)) for f in feats], dtype=np.float64)
    x = assemble(cols, rows.prompt, rows.model, bundle.stats, bundle.prior)
    log50 = bundle.p50.predict(x) + bundle.offset50
    log90 = np.maximum(bundle.p90.predict(x) + bundle.offset90, log50)
    return np.expm1(log50).clip(min=1.0), np.expm1(log90).clip(min=1.0)


def baselines(bundle: Bundle, rows: Rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-model median (training statistics, global median for unknown models) and llm-d's 1.5 x input."""
    entries = [modelstats.lookup(bundle.stats, bundle.prior, m) for m in rows.model]
    median = np.array([e["median"] for e in entries])
    p90 = np.array([e["p90"] for e in entries])
    tokens = np.array(
        [
            float(t) if t is not None else max(1, len(text if isinstance(text, str) else str(text)) // 4)
            for t, text in zip(rows.prompt_tokens, rows.texts, strict=True)
        ]
    )[rows.prompt]
    llmd = 1.5 * tokens
    return {
        "per_model_median": (median, median),
        "llm_d_1.5x_input": (llmd, llmd),
        "per_model_quantiles": (median, p90),
    }


def report(bundle: Bundle, rows: Rows) -> dict:
    """The eval JSON: model metrics at top level, baselines under ``baselines``."""
    p50, p90 = predict_rows(bundle, rows)
    out = evaluate(p50, p90, rows.output_tokens, rows.model)
    out["baselines"] = {
        name: evaluate(b50, b90, rows.output_tokens, rows.model) for name, (b50, b90) in baselines(bundle, rows).items()
    }
    return out
