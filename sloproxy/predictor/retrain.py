"""The retraining job (runs in a worker process): continue boosting on live samples, validate, decide.

Live traffic tells only (prompt, model, params, true completion tokens), so a candidate is the current
heads boosted further on the server-computed rows (``init_model``), recalibrated on one slice of
recent samples and judged against the current heads on the most recent slice, which neither saw.
Both are scored with the same loss, so a swap happens only on measured improvement.

The payload is a small dict naming files in a work directory (``.npy`` samples, LightGBM model
files): writing and reading those is a memcpy or C code that releases the GIL, where pickling
rows and model strings would stall the server's event loop for tens of milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from .columns import CATEGORICAL, COLUMNS
from .metrics import pinball
from .train import Bundle, TrainConfig, conformal_offsets, lgb_params


def quantile_loss(log50: np.ndarray, log90: np.ndarray, y: np.ndarray) -> float:
    """Mean pinball loss of both heads on log1p(tokens): the one yardstick for current vs candidate."""
    return pinball(log50, y, 0.5) + pinball(log90, y, 0.9)


def split_recent(n: int, holdback: float) -> tuple[slice, slice, slice]:
    """Oldest -> train, then calibration, newest -> validation (the traffic the swap will face next)."""
    n_val = max(1, int(n * holdback))
    n_cal = max(1, int(n * holdback))
    return slice(0, n - n_val - n_cal), slice(n - n_val - n_cal, n - n_val), slice(n - n_val, n)


def write_payload(workdir: str | Path, x: np.ndarray, y: np.ndarray, bundle: Bundle, options: dict) -> dict:
    """Write samples (oldest first) and the current heads into ``workdir``; returns the job's payload."""
    d = Path(workdir)
    np.save(d / "x.npy", np.ascontiguousarray(x), allow_pickle=False)
    np.save(d / "y.npy", np.ascontiguousarray(y), allow_pickle=False)
    bundle.p50.save_model(str(d / "p50.txt"))
    bundle.p90.save_model(str(d / "p90.txt"))
    return {"dir": str(d), "offset50": bundle.offset50, "offset90": bundle.offset90, **options}


def read_payload(payload: dict) -> tuple[np.ndarray, np.ndarray, lgb.Booster, lgb.Booster]:
    """(rows, output tokens, current p50 head, current p90 head) as written by ``write_payload``."""
    d = Path(payload["dir"])
    x = np.load(d / "x.npy", allow_pickle=False)
    y = np.load(d / "y.npy", allow_pickle=False)
    return x, y, lgb.Booster(model_file=str(d / "p50.txt")), lgb.Booster(model_file=str(d / "p90.txt"))


def load_boosters(result: dict[str, Any]) -> tuple[lgb.Booster, lgb.Booster]:
    """The accepted candidate's heads (parsed by LightGBM's C loader, which releases the GIL)."""
    return lgb.Booster(model_file=result["p50"]), lgb.Booster(model_file=result["p90"])


def retrain_job(payload: dict) -> dict:
    """Pure function of its payload's files (small dict in and out); see ``OnlineLearner`` for the fields.

    An accepted candidate's heads are written next to the payload; the result names the files.
    """
    x_raw, y_raw, cur50, cur90 = read_payload(payload)
    x = x_raw.astype(np.float64)
    y = np.log1p(y_raw.astype(np.float64))
    tr, cal, val = split_recent(len(y), payload["holdback"])
    off50, off90 = payload["offset50"], payload["offset90"]
    cur_log50 = cur50.predict(x[val]) + off50
    current_loss = quantile_loss(cur_log50, np.maximum(cur90.predict(x[val]) + off90, cur_log50), y[val])

    cfg = TrainConfig(seed=payload.get("seed", 0), num_threads=1, learning_rate=payload.get("learning_rate", 0.05))
    cat = [COLUMNS.index(c) for c in CATEGORICAL]
    heads = []
    for alpha, init in ((0.5, cur50), (0.9, cur90)):
        params = lgb_params(cfg, alpha) | {"min_data_in_leaf": payload.get("min_data_in_leaf", 50)}
        data = lgb.Dataset(x[tr], y[tr], feature_name=list(COLUMNS), categorical_feature=cat)
        heads.append(lgb.train(params, data, num_boost_round=payload.get("rounds", 50), init_model=init))
    new50, new90 = heads
    c50, c90 = conformal_offsets(new50.predict(x[cal]), new90.predict(x[cal]), y[cal], payload.get("coverage", 0.9))
    cand_log50 = new50.predict(x[val]) + c50
    candidate_loss = quantile_loss(cand_log50, np.maximum(new90.predict(x[val]) + c90, cand_log50), y[val])
    better = candidate_loss < current_loss * (1.0 - payload.get("min_improvement", 0.01))
    paths = {"p50": None, "p90": None}
    if better:
        for name, head in (("p50", new50), ("p90", new90)):
            paths[name] = str(Path(payload["dir"]) / f"candidate_{name}.txt")
            head.save_model(paths[name])
    return {
        "accepted": bool(better),
        "current_loss": float(current_loss),
        "candidate_loss": float(candidate_loss),
        "validation_samples": int(val.stop - val.start),
        "p50": paths["p50"],
        "p90": paths["p90"],
        "offset50": float(c50),
        "offset90": float(c90),
    }
