"""Reading training/evaluation data (the ``shared/data/lengths`` formats and pairs files) and splitting it.

Splits are by prompt, never by row: the same instruction answered by two models must not sit on
both sides, or the held-out figures would measure memorisation.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(slots=True)
class Rows:
    """Flat (prompt, model, true length) rows; prompts are indices into ``texts``."""

    texts: list[str]
    prompt_ids: list[str]
    prompt_tokens: list[int | None]
    prompt: np.ndarray  # int index into texts
    model: list[str]
    output_tokens: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.output_tokens)

    def subset_prompts(self, keep_ids: set[str]) -> Rows:
        """Rows whose prompt id is in ``keep_ids`` (texts re-indexed)."""
        old = [i for i, pid in enumerate(self.prompt_ids) if pid in keep_ids]
        remap = np.full(len(self.texts), -1)
        remap[old] = np.arange(len(old))
        mask = remap[self.prompt] >= 0
        return Rows(
            texts=[self.texts[i] for i in old],
            prompt_ids=[self.prompt_ids[i] for i in old],
            prompt_tokens=[self.prompt_tokens[i] for i in old],
            prompt=remap[self.prompt[mask]],
            model=[m for m, k in zip(self.model, mask, strict=True) if k],
            output_tokens=self.output_tokens[mask],
        )


def _need(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def load_lengths(prompts_path: str | Path, lengths_path: str | Path) -> Rows:
    """The alpaca_eval_prompts.jsonl + alpaca_eval_lengths.csv pair; rows of unknown prompts are an error."""
    texts, ids, toks = [], [], []
    index: dict[str, int] = {}
    with _need(prompts_path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                pid, text = str(obj["prompt_id"]), obj["instruction"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{prompts_path}:{n}: expected a JSON object with prompt_id and instruction") from exc
            if not isinstance(text, str):
                raise ValueError(f"{prompts_path}:{n}: instruction must be a string")
            index[pid] = len(texts)
            texts.append(text)
            ids.append(pid)
            pt = obj.get("prompt_tokens")
            toks.append(int(pt) if isinstance(pt, int) else None)
    prompt, model, out = [], [], []
    with _need(lengths_path).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"prompt_id", "generator", "output_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{lengths_path}: missing columns {sorted(missing)}")
        for n, rec in enumerate(reader, 2):
            pid = rec["prompt_id"]
            if pid not in index:
                raise ValueError(f"{lengths_path}:{n}: prompt_id {pid!r} not in {prompts_path}")
            try:
                tokens = int(rec["output_tokens"])
            except ValueError as exc:
                raise ValueError(f"{lengths_path}:{n}: output_tokens must be an integer") from exc
            prompt.append(index[pid])
            model.append(rec["generator"])
            out.append(max(0, tokens))
    if not out:
        raise ValueError(f"{lengths_path}: no rows")
    return Rows(texts, ids, toks, np.asarray(prompt, dtype=np.int64), model, np.asarray(out, dtype=np.float64))


def load_pairs(path: str | Path) -> Rows:
    """A pairs file: one ``{"prompt": str, "output_tokens": int, "model"?: str}`` per line."""
    texts, model, out = [], [], []
    with _need(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, tokens = obj["prompt"], int(obj["output_tokens"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: expected {{'prompt': str, 'output_tokens': int}}") from exc
            if not isinstance(text, str) and not isinstance(text, list):
                raise ValueError(f"{path}:{n}: prompt must be a string or a message list")
            texts.append(text)
            model.append(str(obj.get("model") or ""))
            out.append(max(0, tokens))
    if not out:
        raise ValueError(f"{path}: no rows")
    n = len(texts)
    return Rows(
        texts,
        [str(i) for i in range(n)],
        [None] * n,
        np.arange(n, dtype=np.int64),
        model,
        np.asarray(out, dtype=np.float64),
    )


def holdout_ids(prompt_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded, order-independent choice of ``fraction`` of the prompt ids."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("holdout fraction must be in (0, 1)")
    ordered = sorted(set(prompt_ids))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ordered))
    k = max(1, round(fraction * len(ordered)))
    return {ordered[i] for i in perm[:k]}
