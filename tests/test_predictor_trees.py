"""The compiled tree walk (``_trees.c``) predicts exactly what LightGBM predicts for the same row."""

from __future__ import annotations

import ctypes

import lightgbm as lgb
import numpy as np
import pytest

from sloproxy.predictor import compiled_trees
from sloproxy.predictor.columns import CATEGORICAL, COLUMNS, N_COLUMNS
from sloproxy.predictor.compiled_trees import compile_booster, forest_arrays
from sloproxy.predictor.fastpredict import FastBooster
from sloproxy.predictor.serving import LengthPredictor

pytestmark = pytest.mark.skipif(compiled_trees.Forest is None, reason="the C extension was not built here")


def _disagreements(booster: lgb.Booster, rows: np.ndarray) -> int:
    row = (ctypes.c_double * rows.shape[1])()
    compiled = FastBooster(booster, rows.shape[1], row)
    reference = FastBooster(booster, rows.shape[1], row, compiled=False)
    assert compiled._forest is not None and reference._forest is None
    wrong = 0
    for values in rows:
        row[:] = values.tolist()
        wrong += compiled.predict_loaded() != reference.predict_loaded()  # bit for bit, not approximately
    return wrong


def _odd_rows(rng: np.random.Generator, n: int, cols: int, categorical: list[int]) -> np.ndarray:
    rows = rng.normal(0, 3, (n, cols))
    rows[rng.random((n, cols)) < 0.15] = np.nan
    rows[rng.random((n, cols)) < 0.1] = 0.0
    rows[rng.random((n, cols)) < 0.05] = 1e-40  # LightGBM reads values this close to zero as zero
    rows[rng.random((n, cols)) < 0.05] = -0.0
    for c in categorical:
        cats = rng.integers(-2, 12, n).astype(float)
        cats[rng.random(n) < 0.1] = np.nan
        cats[rng.random(n) < 0.05] = 5000.0  # past every bitset
        cats[rng.random(n) < 0.03] = rng.choice([3e9, -3e9, 1e300, -0.5])  # past int; just below zero
        rows[:, c] = cats
    return rows


def test_the_packaged_heads_agree_with_lightgbm_on_real_and_odd_rows(shared_data) -> None:
    import json

    predictor = LengthPredictor.load()
    lines = (shared_data / "lengths" / "alpaca_eval_prompts.jsonl").read_text().splitlines()[:300]
    real = np.array(
        [predictor.row(predictor.predict_request(json.loads(line)["instruction"]).features) for line in lines]
    )
    categorical = [COLUMNS.index(c) for c in CATEGORICAL]
    odd = _odd_rows(np.random.default_rng(0), 3000, N_COLUMNS, categorical)
    for head in (predictor.bundle.p50, predictor.bundle.p90):
        assert _disagreements(head, real) == 0
        assert _disagreements(head, odd) == 0


@pytest.mark.parametrize("params", [{}, {"zero_as_missing": True}, {"use_missing": False}])
def test_categorical_splits_and_every_missing_rule_agree(params: dict) -> None:
    """A model that splits on categories (many-valued bitsets) and on missing values, trained here."""
    rng = np.random.default_rng(1)
    n = 4000
    x = _odd_rows(rng, n, 6, [4, 5])
    x[:, 5] = rng.integers(0, 70, n)  # categories past 32: bitsets of several words
    cat_effect = np.where(np.isin(x[:, 5], [3, 40, 41, 65]), 5.0, 0.0) + np.where(x[:, 4] == 2, -3.0, 0.0)
    y = np.nan_to_num(x[:, 0]) * 2 + np.isnan(x[:, 1]) * 4 + (x[:, 2] == 0) * 3 + cat_effect + rng.normal(0, 0.1, n)
    booster = lgb.train(
        {"objective": "quantile", "alpha": 0.9, "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, **params},
        lgb.Dataset(x, y, categorical_feature=[4, 5]),
        num_boost_round=40,
    )
    arrays = forest_arrays(booster.model_to_string())
    assert len(arrays["cat_bits"]) > len(arrays["cat_bounds"]) - 1  # some bitset spans more than one word
    decisions = arrays["nodes"]["decision"]
    assert (decisions & 1).any() and ((decisions >> 2) & 3 != 0).any()  # categorical and missing-aware splits
    assert _disagreements(booster, _odd_rows(np.random.default_rng(2), 3000, 6, [4, 5])) == 0


def test_a_model_of_single_leaf_trees_sums_its_leaves() -> None:
    x = np.zeros((50, 3))
    booster = lgb.train({"objective": "regression", "verbose": -1}, lgb.Dataset(x, np.full(50, 2.5)), 3)
    assert forest_arrays(booster.model_to_string())["nodes"].size == 0
    assert _disagreements(booster, np.random.default_rng(3).normal(size=(20, 3))) == 0


def test_models_whose_output_is_transformed_stay_with_lightgbm() -> None:
    """A random forest averages its trees and a binary model applies a sigmoid: not plain sums, so
    they are not compiled and LightGBM predicts them."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3))
    binary = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, x[:, 0] > 0), 5)
    forest = lgb.train(
        {"boosting": "rf", "bagging_fraction": 0.5, "bagging_freq": 1, "verbose": -1}, lgb.Dataset(x, x[:, 0]), 5
    )
    for booster in (binary, forest):
        with pytest.raises(ValueError):
            forest_arrays(booster.model_to_string())
        fast = FastBooster(booster, 3)
        assert fast._forest is None
        for row in x[:5]:
            assert fast.predict(row.tolist()) == pytest.approx(booster.predict(row[None, :])[0])


def test_inconsistent_arrays_are_refused_not_walked() -> None:
    """The walk trusts its indices, so construction checks them: a bad child, a cycle, a feature past
    the row or a missing bitset is a ValueError, never a read outside the arrays or an endless walk."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 4))
    booster = lgb.train({"objective": "regression", "num_leaves": 7, "verbose": -1}, lgb.Dataset(x, x[:, 0]), 5)
    good = forest_arrays(booster.model_to_string())

    def build(**changes) -> None:
        arrays = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in {**good, **changes}.items()}
        compiled_trees.Forest(**{k: v.tobytes() if isinstance(v, np.ndarray) else v for k, v in arrays.items()})

    build()  # the unchanged arrays are fine
    for field, value in [("left", 99), ("right", -99), ("left", 0), ("feature", 4)]:
        nodes = good["nodes"].copy()
        nodes[field][0] = value
        with pytest.raises(ValueError):
            build(nodes=nodes)
    nodes = good["nodes"].copy()
    nodes["decision"][0] |= 1  # categorical, but the model has no bitsets
    with pytest.raises(ValueError):
        build(nodes=nodes)
    with pytest.raises(ValueError):
        build(leaves=good["leaves"][:-1])
    with pytest.raises(ValueError):
        build(n_features=0)  # every split reads feature 0 (the target is x[:, 0])
    forest = compile_booster(booster)
    with pytest.raises(ValueError, match="float64"):
        forest.predict(b"\0" * 8)


def test_the_request_path_predicts_what_lightgbm_does_for_its_rows(shared_data) -> None:
    """``predict_request`` and ``predict_many`` hand each row to the compiled walks as packed float64
    bytes: their p50 and p90 are bit for bit those of LightGBM's own prediction of the same row."""
    import json

    predictor = LengthPredictor.load()
    assert predictor._walks is not None
    lines = (shared_data / "lengths" / "alpaca_eval_prompts.jsonl").read_text().splitlines()[:200]
    calls = [
        (json.loads(line)["instruction"], "m", limit, 0.7, None, None, None)
        for line, limit in zip(lines, [None, 4096, 64, 1] * 50, strict=True)
    ]
    row = (ctypes.c_double * N_COLUMNS)()
    heads = [FastBooster(head, N_COLUMNS, row, compiled=False) for head in (predictor.bundle.p50, predictor.bundle.p90)]
    batched = predictor.predict_many(calls)
    for call, together in zip(calls, batched, strict=True):
        alone = predictor.predict_request(*call)
        row[:] = together.row
        reference = predictor._finish(heads[0].predict_loaded(), heads[1].predict_loaded(), call[2])
        assert (alone.p50, alone.p90) == (together.p50, together.p90) == reference
