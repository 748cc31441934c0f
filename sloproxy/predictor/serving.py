"""The request-path predictor: featurise one request and return (p50, p90) output tokens.

Everything here is synchronous and bounded (tens to a few hundred microseconds), so the proxy
calls it inline on the event loop; there is no I/O and no allocation proportional to prompt size
beyond the bounded window.
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import artifact
from .columns import N_COLUMNS, model_row
from .fastpredict import FastBooster
from .features import PromptFeatures, featurise
from .modelstats import lookup
from .train import Bundle

# What ``predict_request`` takes, positionally: prompt, model, max_tokens, temperature, slo_class,
# tenant, prompt_tokens_estimate.
PredictCall = tuple[Any, str | None, int | None, float | None, str | None, str | None, int | None]


def default_model_dir() -> Path:
    """The artifact shipped inside the package (trained on all the shared data; ``make predictor-model``)."""
    return Path(__file__).resolve().parent / "default_model"


@dataclass(slots=True)
class Prediction:
    p50: float
    p90: float
    features: PromptFeatures  # keep on the request; the online learner records it when the reply ends
    row: list[float] | None = None  # the LightGBM row the heads saw (the online learner stores it as is)


class LengthPredictor:
    """A loaded artifact with one-row fast paths for both quantile heads."""

    def __init__(self, bundle: Bundle, source: str = "") -> None:
        self.bundle = bundle
        self.source = source
        # One buffer for both heads: the row is copied in once, by struct (half the cost of a ctypes
        # slice assignment, which converts element by element).
        self._row_bytes = bytearray(8 * N_COLUMNS)
        self._row = (ctypes.c_double * N_COLUMNS).from_buffer(self._row_bytes)
        self._pack_row = struct.Struct(f"{N_COLUMNS}d").pack_into
        # A row as float64 bytes for the compiled walks: struct packs the 32 floats in a third of the
        # time array("d", row) takes (which converts element by element); the bytes are the same.
        self._doubles = struct.Struct(f"{N_COLUMNS}d").pack
        self._p50 = FastBooster(bundle.p50, N_COLUMNS, self._row)
        self._p90 = FastBooster(bundle.p90, N_COLUMNS, self._row)
        walk50, walk90 = self._p50.compiled_walk, self._p90.compiled_walk
        # both heads compiled: each row goes to both walks as one float64 array (no shared buffer)
        self._walks = (walk50, walk90) if walk50 is not None and walk90 is not None else None
        self._stats_cache: dict[str, list[float]] = {}
        self._score = bundle.text.score
        self._prior_cache: dict[str, tuple[float, float]] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> LengthPredictor:
        """Load an artifact (default: the packaged one); raises ``ArtifactError`` on a version mismatch."""
        p = Path(path) if path is not None else default_model_dir()
        return cls(artifact.load(p), source=str(p))

    def model_stats(self, model: str) -> list[float]:
        stats = self._stats_cache.get(model)
        if stats is None:
            stats = lookup(self.bundle.stats, self.bundle.prior, model)["stats"]
            if len(self._stats_cache) < 4096:  # bounded: client-chosen model names are unbounded
                self._stats_cache[model] = stats
        return stats

    def prior(self, model: str) -> tuple[float, float]:
        """The model's median and p90 reply in tokens over the training data (the global prior for a
        model never seen): the estimate before, or instead of, reading the prompt."""
        cached = self._prior_cache.get(model)
        if cached is None:
            entry = lookup(self.bundle.stats, self.bundle.prior, model)
            cached = (max(1.0, float(entry["median"])), max(1.0, float(entry["p90"])))
            if len(self._prior_cache) < 4096:  # bounded: client-chosen model names are unbounded
                self._prior_cache[model] = cached
        return cached

    def row(self, f: PromptFeatures) -> list[float]:
        """The LightGBM input row of already computed features (text score, cues, params, model stats)."""
        return model_row(f, self._score(f), self.model_stats(f.model))

    def predict_features(self, f: PromptFeatures, max_tokens: int | None = None) -> tuple[float, float]:
        """(p50, p90) in tokens for already computed features; capped by ``max_tokens``."""
        return self._predict_row(self.row(f), max_tokens)

    def _predict_row(self, row: list[float], max_tokens: int | None) -> tuple[float, float]:
        if self._walks is not None:
            walk50, walk90 = self._walks
            values = self._doubles(*row)
            return self._finish(walk50(values), walk90(values), max_tokens)
        self._pack_row(self._row_bytes, 0, *row)
        return self._finish(self._p50.predict_loaded(), self._p90.predict_loaded(), max_tokens)

    def _finish(self, raw50: float, raw90: float, max_tokens: int | None) -> tuple[float, float]:
        """Tokens from the heads' log outputs: calibrated, ordered, at least one, capped by the limit."""
        bundle = self.bundle
        log50 = raw50 + bundle.offset50
        log90 = raw90 + bundle.offset90
        if log90 < log50:
            log90 = log50
        p50 = math.expm1(log50)
        p90 = math.expm1(log90)
        # max(1.0, x) and min(x, limit) as comparisons: the same values (NaN included), no calls
        if not p50 >= 1.0:
            p50 = 1.0
        if not p90 >= 1.0:
            p90 = 1.0
        if max_tokens is not None and max_tokens > 0:
            limit = float(max_tokens)
            if limit < p50:
                p50 = limit
            if limit < p90:
                p90 = limit
        return p50, p90

    def predict_request(
        self,
        prompt: Any,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        slo_class: str | None = None,
        tenant: str | None = None,
        prompt_tokens_estimate: int | None = None,
    ) -> Prediction:
        f = featurise(prompt, model, max_tokens, temperature, slo_class, tenant, prompt_tokens_estimate)
        row = self.row(f)
        p50, p90 = self._predict_row(row, max_tokens)
        return Prediction(p50, p90, f, row)

    def predict_many(self, calls: Sequence[PredictCall]) -> list[Prediction]:
        """``predict_request`` for several requests, each stage over all of them before the next."""
        if len(calls) == 1:
            return [self.predict_request(*calls[0])]
        features = [featurise(*call) for call in calls]  # the featuriser's code and tables stay warm
        rows = [self.row(f) for f in features]
        if self._walks is not None:  # each row converted once, read by both heads
            walk50, walk90 = self._walks
            pack = self._doubles
            doubles = [pack(*row) for row in rows]
            raw50 = [walk50(values) for values in doubles]  # one head over all rows, then the other
            finish = self._finish
            return [
                Prediction(*finish(a, walk90(values), call[2]), f, row)
                for f, row, a, values, call in zip(features, rows, raw50, doubles, calls, strict=True)
            ]
        pack, buffer, head50, head90 = self._pack_row, self._row_bytes, self._p50, self._p90
        raw50 = []
        for row in rows:  # one head over all rows, then the other: each head's trees stay in cache
            pack(buffer, 0, *row)
            raw50.append(head50.predict_loaded())
        out = []
        for f, row, a, call in zip(features, rows, raw50, calls, strict=True):
            pack(buffer, 0, *row)
            p50, p90 = self._finish(a, head90.predict_loaded(), call[2])
            out.append(Prediction(p50, p90, f, row))
        return out

    def predict(
        self,
        prompt: Any,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        slo_class: str | None = None,
        tenant: str | None = None,
        prompt_tokens_estimate: int | None = None,
    ) -> tuple[float, float]:
        """(p50, p90) output tokens for one request: prompt string or chat messages, plus its parameters."""
        pred = self.predict_request(prompt, model, max_tokens, temperature, slo_class, tenant, prompt_tokens_estimate)
        return pred.p50, pred.p90
