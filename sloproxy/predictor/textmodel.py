"""Prompt verbosity from text: ridge regression over hashed n-grams.

The target is a prompt's latent verbosity (how much longer than usual models answer it); the
ridge is solved in its dual form because there are far fewer prompts than hash buckets. At
serving time the score is a sum of looked-up weights, i.e. a few microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .features import NGRAM_DIM, PromptFeatures

_sum = np.add.reduce  # skips ndarray.sum's Python-level wrapper (a few microseconds per call)

try:
    from ._ngrams import text_score as _compiled_score
except ImportError:  # installed without a C compiler: numpy scores, to the same bits
    _compiled_score = None


def _row_values(f: PromptFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Bucket indices and values of one prompt: each block (words, chars) scaled to unit-ish norm."""
    idx = np.concatenate([f.words, f.chars])
    vals = np.concatenate(
        [
            np.full(len(f.words), 1.0 / np.sqrt(max(1, len(f.words)))),
            np.full(len(f.chars), 1.0 / np.sqrt(max(1, len(f.chars)))),
        ]
    )
    return idx, vals


def design_matrix(feats: Sequence[PromptFeatures]) -> sp.csr_matrix:
    """Sparse prompt x bucket matrix (repeated buckets add up, as at serving time)."""
    rows, cols, vals = [], [], []
    for i, f in enumerate(feats):
        idx, v = _row_values(f)
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(v)
    if not feats:
        return sp.csr_matrix((0, NGRAM_DIM))
    m = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(feats), NGRAM_DIM)
    )
    m.sum_duplicates()
    return m


class TextModel:
    """Linear score over hashed buckets; ``weights`` is dense in memory, sparse on disk."""

    def __init__(self, weights: np.ndarray, bias: float) -> None:
        self.weights = np.array(weights, dtype=np.float64, order="C")  # a copy the compiled score reads as is
        self.bias = float(bias)

    def score(self, f: PromptFeatures) -> float:
        """Bias plus each block's weight sum over sqrt(block size), in one call of ``_ngrams.c``
        where it was built (the same sums, in numpy's order: :meth:`score_numpy` is the definition)."""
        if _compiled_score is None:
            return self.score_numpy(f)
        return _compiled_score(f.word_ids, f.char_ids, self.weights, self.bias)

    def score_numpy(self, f: PromptFeatures) -> float:
        """:meth:`score` with numpy: two gathers and pairwise sums."""
        w = self.weights
        s = self.bias
        n = len(f.words)
        if n:
            s += float(_sum(w.take(f.words))) / math.sqrt(n)
        n = len(f.chars)
        if n:
            s += float(_sum(w.take(f.chars))) / math.sqrt(n)
        return s

    def save(self, path: Path) -> None:
        """Text format: a bias line, then ``bucket weight`` for the non-zero buckets."""
        nz = np.flatnonzero(self.weights)
        lines = [f"bias {self.bias:.9g}"] + [f"{i} {self.weights[i]:.6g}" for i in nz]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TextModel:
        weights = np.zeros(NGRAM_DIM, dtype=np.float64)
        bias = 0.0
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "bias":
                    bias = float(value)
                elif key:
                    weights[int(key)] = float(value)
        return cls(weights, bias)


def fit_ridge(x: sp.csr_matrix, y: np.ndarray, alpha: float) -> TextModel:
    """Dual ridge: w = X^T (X X^T + alpha I)^-1 (y - mean)."""
    mean = float(y.mean()) if len(y) else 0.0
    if x.shape[0] == 0:
        return TextModel(np.zeros(NGRAM_DIM), mean)
    gram = (x @ x.T).toarray()
    coef = np.linalg.solve(gram + alpha * np.eye(len(y)), y - mean)
    w = np.asarray(x.T @ coef).ravel()
    return TextModel(w, mean)


def oof_ridge(x: sp.csr_matrix, y: np.ndarray, alpha: float, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions so downstream models see text scores as noisy as on unseen prompts."""
    out = np.zeros(len(y))
    for k in np.unique(folds):
        test = folds == k
        model = fit_ridge(x[~test], y[~test], alpha)
        out[test] = x[test] @ model.weights + model.bias
    return out
