"""Artifact directory: LightGBM text models, the text ridge, model statistics and versioned metadata.

Loading refuses an artifact whose feature spec differs from this code's: the trees index columns
by position, so a silent mismatch would produce confident nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb

from .columns import COLUMNS
from .features import FEATURE_SPEC_VERSION
from .textmodel import TextModel
from .train import Bundle

FORMAT = "sloproxy-length-predictor"
FORMAT_VERSION = 1
FILES = ("meta.json", "text_model.txt", "p50.txt", "p90.txt", "model_stats.json")


class ArtifactError(ValueError):
    """The artifact is missing, corrupt or built for another feature spec."""


def save(bundle: Bundle, out: str | Path) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    bundle.text.save(path / "text_model.txt")
    bundle.p50.save_model(str(path / "p50.txt"))
    bundle.p90.save_model(str(path / "p90.txt"))
    (path / "model_stats.json").write_text(
        json.dumps({"prior": bundle.prior, "models": bundle.stats}, sort_keys=True, indent=0) + "\n", encoding="utf-8"
    )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "columns": list(COLUMNS),
        "offset50": bundle.offset50,
        "offset90": bundle.offset90,
        "training": bundle.meta,
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_meta(path: str | Path) -> dict:
    """meta.json after the version checks."""
    p = Path(path)
    if not (p / "meta.json").is_file():
        raise ArtifactError(f"{p}: not a predictor artifact (no meta.json)")
    try:
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}/meta.json: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{p}: artifact format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"this code reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    if meta.get("feature_spec_version") != FEATURE_SPEC_VERSION or meta.get("columns") != list(COLUMNS):
        raise ArtifactError(
            f"{p}: trained for feature spec v{meta.get('feature_spec_version')}, this code computes "
            f"v{FEATURE_SPEC_VERSION}; retrain it (make predictor-model)"
        )
    missing = [f for f in FILES if not (p / f).is_file()]
    if missing:
        raise ArtifactError(f"{p}: missing {', '.join(missing)}")
    return meta


def load(path: str | Path) -> Bundle:
    p = Path(path)
    meta = read_meta(p)
    stats = json.loads((p / "model_stats.json").read_text(encoding="utf-8"))
    return Bundle(
        text=TextModel.load(p / "text_model.txt"),
        p50=lgb.Booster(model_file=str(p / "p50.txt")),
        p90=lgb.Booster(model_file=str(p / "p90.txt")),
        stats=stats["models"],
        prior=stats["prior"],
        offset50=float(meta["offset50"]),
        offset90=float(meta["offset90"]),
        meta=meta.get("training", {}),
    )
