"""The LightGBM input row: one definition used by training, serving and online retraining."""

from __future__ import annotations

from .features import CUE_NAMES, PARAM_NAMES, PromptFeatures
from .modelstats import STAT_NAMES

COLUMNS: tuple[str, ...] = ("text_score", *CUE_NAMES, *PARAM_NAMES, *STAT_NAMES)
N_COLUMNS = len(COLUMNS)
CATEGORICAL: tuple[str, ...] = ("slo_class", "tenant", "first_word_class")


def prompt_part(f: PromptFeatures, text_score: float) -> list[float]:
    """Model-independent columns of a request."""
    return [text_score, *f.cues, *f.params]


def full_row(prompt_cols: list[float], model_stats: list[float]) -> list[float]:
    return prompt_cols + model_stats
