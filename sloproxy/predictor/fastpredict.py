"""One-row LightGBM prediction through the C API's "fast" single-row path.

``Booster.predict`` validates and converts its input on every call (~0.2 ms for one row measured);
the C API's FastConfig prepares that once, so a call costs a ctypes hop plus the tree walks (~4 µs
per head warm). With the proxy's other work between predictions a lone row's tree walks miss cache
(~100 µs for both heads measured cold), so the proxy predicts the rows nobody waits on in batches,
row after row while the trees are in cache (``LGBM_BoosterPredictForMat`` builds a predictor per call:
37 µs for 7 rows warm, against 29 µs for 7 fast single rows). Falls back to ``Booster.predict`` if the
library lacks the entry points.

Where the C extension is built, the trees are walked by ``_trees.c`` instead (compiled_trees.py:
the same sums, in a fraction of the time); LightGBM's path is the fallback.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
from lightgbm.basic import _LIB, _safe_call

from .compiled_trees import compile_booster

_PREDICT_NORMAL = 0
_DTYPE_FLOAT64 = 1


class FastBooster:
    """Single-row predictor bound to one booster; not thread-safe (one per event loop)."""

    def __init__(
        self, booster: lgb.Booster, ncol: int, row: ctypes.Array | None = None, *, compiled: bool = True
    ) -> None:
        self._booster = booster  # keeps the C handle alive
        self._ncol = ncol
        self._row = row if row is not None else (ctypes.c_double * ncol)()  # may be shared by several heads
        self._out = ctypes.c_double()
        self._len = ctypes.c_int64()
        self._cfg: ctypes.c_void_p | None = None
        self._forest = None
        if compiled and booster.num_feature() <= ncol:
            try:
                self._forest = compile_booster(booster)
            except ValueError:  # a kind of model the compiled walk does not cover (linear trees...)
                self._forest = None
        # the compiled walk itself (None without it): callers holding the row as float64s call it directly
        self.compiled_walk: Callable[[Any], float] | None = None
        if self._forest is not None:
            self.compiled_walk = self._forest.predict
            return
        try:
            cfg = ctypes.c_void_p()
            _safe_call(
                _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                    booster._handle,
                    ctypes.c_int(_PREDICT_NORMAL),
                    ctypes.c_int(0),
                    ctypes.c_int(-1),
                    ctypes.c_int(_DTYPE_FLOAT64),
                    ctypes.c_int32(ncol),
                    ctypes.c_char_p(b"num_threads=1"),
                    ctypes.byref(cfg),
                )
            )
            self._cfg = cfg
            self._fn = _LIB.LGBM_BoosterPredictForMatSingleRowFast
            self._len_ref = ctypes.byref(self._len)
            self._out_ref = ctypes.byref(self._out)
        except (AttributeError, lgb.basic.LightGBMError):  # pragma: no cover - old or stripped library
            self._cfg = None

    def predict(self, row: list[float]) -> float:
        self._row[:] = row
        return self.predict_loaded()

    def predict_loaded(self) -> float:
        """Predict on the row already in the (possibly shared) buffer: heads sharing it copy the row once."""
        walk = self.compiled_walk
        if walk is not None:
            return walk(self._row)
        if self._cfg is None:  # pragma: no cover
            return float(self._booster.predict(np.asarray([self._row[:]], dtype=np.float64))[0])
        if self._fn(self._cfg, self._row, self._len_ref, self._out_ref) != 0:
            raise lgb.basic.LightGBMError(_LIB.LGBM_GetLastError().decode("utf-8"))
        return self._out.value

    def __del__(self) -> None:
        cfg = getattr(self, "_cfg", None)
        if cfg is not None:
            _LIB.LGBM_FastConfigFree(cfg)
            self._cfg = None
