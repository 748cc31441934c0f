"""The LightGBM input row: one definition used by training, serving and online retraining."""

from __future__ import annotations

from collections.abc import Sequence

from .features import CUE_NAMES, PARAM_NAMES, PromptFeatures
from .modelstats import STAT_NAMES

COLUMNS: tuple[str, ...] = ("text_score", *CUE_NAMES, *PARAM_NAMES, *STAT_NAMES)
N_COLUMNS = len(COLUMNS)
CATEGORICAL: tuple[str, ...] = ("slo_class", "tenant", "first_word_class")


def model_row(f: PromptFeatures, text_score: float, model_stats: Sequence[float] = ()) -> list[float]:
    """A request's row in ``COLUMNS``' order. Training passes no model stats (``assemble`` adds them
    per model); serving builds the whole row in this one call."""
    return [text_score, *f.cues, *f.params, *model_stats]
