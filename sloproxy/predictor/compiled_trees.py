"""A LightGBM booster's trees as flat arrays for ``_trees.c``, which walks them for one row.

Why: each request is predicted by two 100-tree heads. LightGBM's single-row path (fastpredict.py)
costs a ctypes call plus walks over trees spread across many small vectors; the compiled walk
reads small node records from one block per head. It computes what LightGBM computes for the same row
(tests/test_predictor_trees.py compares the two), so the compiled forest is used wherever the
extension was built, and LightGBM's own path otherwise.

The arrays come from the model's text form (``Booster.model_to_string``), which LightGBM writes
with round-trip precision, so thresholds and leaf values are the booster's own doubles.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np

try:
    from ._trees import Forest
except ImportError:  # installed without a C compiler: LightGBM's single-row path predicts
    Forest = None

NODE = np.dtype(
    [("threshold", "<f8"), ("left", "<i2"), ("right", "<i2"), ("feature", "<u2"), ("decision", "u1"), ("unused", "u1")]
)
TREE = np.dtype([("first_node", "<i4"), ("n_nodes", "<i4"), ("first_leaf", "<i4"), ("n_leaves", "<i4")])
_CATEGORICAL = 1
# objectives whose prediction is the raw sum of the trees (the length heads are quantile regressions)
_UNTRANSFORMED = frozenset({"quantile", "regression", "regression_l1", "huber", "fair", "mape"})


def _numbers(fields: dict[str, str], key: str, dtype: type) -> np.ndarray:
    text = fields.get(key, "")
    return np.array(text.split(), dtype=dtype) if text else np.zeros(0, dtype=dtype)


def forest_arrays(model_text: str) -> dict[str, np.ndarray | int]:
    """Nodes, trees, leaves and categorical bitsets of every tree, in LightGBM's order."""
    head, _, body = model_text.partition("\nTree=")
    lines = head.splitlines()
    header = dict(line.split("=", 1) for line in lines if "=" in line)
    if int(header.get("num_tree_per_iteration", "1")) != 1 or "average_output" in lines:
        raise ValueError("only single-output boosted models are compiled")
    if header.get("objective", "").split()[0] not in _UNTRANSFORMED:
        raise ValueError(f"objective {header.get('objective')!r} transforms the raw score; LightGBM predicts it")
    n_features = int(header["max_feature_idx"]) + 1
    body = body.split("\nend of trees", 1)[0]
    nodes, trees, leaves, bounds, bits = [], [], [], [0], []
    node_count = leaf_count = 0
    for section in body.split("\nTree="):
        fields = dict(line.split("=", 1) for line in section.splitlines() if "=" in line)
        if fields.get("is_linear", "0") != "0":
            raise ValueError("linear trees are not compiled")
        leaf_values = _numbers(fields, "leaf_value", np.float64)
        n_inner = int(fields["num_leaves"]) - 1
        tree_nodes = np.zeros(n_inner, dtype=NODE)
        if n_inner:
            tree_nodes["threshold"] = _numbers(fields, "threshold", np.float64)
            tree_nodes["left"] = _numbers(fields, "left_child", np.int64)
            tree_nodes["right"] = _numbers(fields, "right_child", np.int64)
            tree_nodes["feature"] = _numbers(fields, "split_feature", np.int64)
            tree_nodes["decision"] = _numbers(fields, "decision_type", np.int64)
            categorical = (tree_nodes["decision"] & _CATEGORICAL) != 0
            # a categorical node's threshold is its bitset's index in this tree; make it global
            tree_nodes["threshold"][categorical] += len(bounds) - 1
            tree_bounds = _numbers(fields, "cat_boundaries", np.int64)
            bounds.extend((tree_bounds[1:] + len(bits)).tolist())
            bits.extend(_numbers(fields, "cat_threshold", np.int64).tolist())
        trees.append((node_count, n_inner, leaf_count, len(leaf_values)))
        nodes.append(tree_nodes)
        leaves.append(leaf_values)
        node_count += n_inner
        leaf_count += len(leaf_values)
    return {
        "nodes": np.concatenate(nodes) if nodes else np.zeros(0, dtype=NODE),
        "trees": np.array(trees, dtype=TREE),
        "leaves": np.concatenate(leaves) if leaves else np.zeros(0),
        "cat_bounds": np.array(bounds, dtype="<i4"),
        "cat_bits": np.array(bits, dtype="<u4"),
        "n_features": n_features,
    }


def compile_booster(booster: lgb.Booster) -> Forest | None:
    """The booster's compiled forest, or None where the extension is not built."""
    if Forest is None:
        return None
    arrays = forest_arrays(booster.model_to_string(num_iteration=-1))
    return Forest(**{k: v.tobytes() if isinstance(v, np.ndarray) else v for k, v in arrays.items()})
