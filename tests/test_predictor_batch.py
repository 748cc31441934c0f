"""Batched featurising and prediction: a request's features and prediction do not depend on its batch.

The proxy predicts the requests of one loop turn together (one set of numpy calls for all of them),
training featurises one prompt at a time: both must see the same buckets, cues and rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sloproxy.predictor.features import featurise, featurise_batch
from sloproxy.predictor.serving import LengthPredictor

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lengths" / "alpaca_eval_prompts.jsonl"

EDGE_PROMPTS: list = [
    "",
    "hi",
    "a",
    "ab",
    "abc",
    "abcd",
    "\n",
    "\n\nx",
    "- item\nx",
    "List 7 reasons for tea",
    "Write 500 words about tea, in 3 paragraphs.",
    "Write a detailed, step-by-step Python tutorial: 10 tips and a 300-character summary.",
    "Briefly summarize this in one sentence. Keep it short and brief.",
    "word " * 300 + "\nsecond line with five words",  # a first line longer than the first-line read
    "one\ntwo three four five words",  # a first line shorter than the window
    "x" * 5000 + "\n\nSummarise the report above in three sentences. What is the main finding?",
    "é" * 400,
    "日本語のテキスト " * 100,
    "\ud800 lone surrogate",
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Write ten haiku"}],
    [{"role": "user", "content": [{"type": "text", "text": "Now a haiku."}, {"type": "image_url"}]}],
    ["a", "b"],
    None,
    [],
]


@pytest.fixture(scope="module")
def calls() -> list[tuple]:
    texts = [json.loads(line)["instruction"] for line in PROMPTS.read_text().splitlines()]
    prompts = texts + EDGE_PROMPTS
    assert len(texts) > 600
    return [
        (
            prompt,
            "llama-3-8b" if i % 2 else "unknown-model",
            256 if i % 3 else None,
            0.5 if i % 2 else None,
            "batch" if i % 5 == 0 else None,
            None,
            None if i % 4 else 17,
        )
        for i, prompt in enumerate(prompts)
    ]


def _same_floats(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("size", [2, 5, 17])
def test_each_request_of_a_batch_gets_its_own_features(calls: list[tuple], size: int) -> None:
    """Within a batch, the buckets of request j (``*_segments == j``) are exactly, in order, what
    featurising it alone gives: no n-gram runs across two prompts, none is lost or reordered."""
    alone = [featurise(*call) for call in calls]
    for start in range(0, len(calls), size):
        batch = featurise_batch(calls[start : start + size])
        assert len(batch) == len(calls[start : start + size])
        for j in range(len(batch)):
            single = alone[start + j]
            words = batch.words[batch.word_segments == j]
            chars = batch.chars[batch.char_segments == j]
            assert np.array_equal(words, single.words) and np.array_equal(chars, single.chars)
            assert (batch.word_counts[j], batch.char_counts[j]) == (len(single.words), len(single.chars))
            assert _same_floats(batch.cues[j], single.cues) and _same_floats(batch.params[j], single.params)
            assert (batch.models[j], batch.prompt_tokens[j]) == (single.model, single.prompt_tokens)
    assert featurise("hi").words.dtype == np.int64 and featurise("hi").chars.dtype == np.int64


def test_a_prediction_does_not_depend_on_its_batch(calls: list[tuple]) -> None:
    """Alone, in batches of 3 or 7, or all at once: the same row to the last bit, the same p50 and
    p90, and the row is the one training's path (``row(featurise(...))``) builds."""
    predictor = LengthPredictor.load()
    alone = [predictor.predict_request(*call) for call in calls]
    for size in (3, 7, len(calls)):
        batched = [p for s in range(0, len(calls), size) for p in predictor.predict_many(calls[s : s + size])]
        for a, b in zip(alone, batched, strict=True):
            assert (a.p50, a.p90) == (b.p50, b.p90) and _same_floats(a.row, b.row)
    for call, prediction in zip(calls, alone, strict=True):
        assert _same_floats(predictor.row(featurise(*call)), prediction.row)
        limit = call[2]
        assert 1.0 <= prediction.p50 <= prediction.p90 and (limit is None or prediction.p90 <= limit)


def test_text_score_is_the_scaled_weight_sums(calls: list[tuple]) -> None:
    """The batched score against an independent computation (exactly rounded sums): it sums each
    request's own buckets, scaled by each block's size."""
    text = LengthPredictor.load().bundle.text
    batch = featurise_batch(calls[:40])
    for j, score in enumerate(text.scores(batch)):
        expected = text.bias
        for buckets in (batch.words[batch.word_segments == j], batch.chars[batch.char_segments == j]):
            if len(buckets):
                expected += math.fsum(text.weights[buckets].tolist()) / math.sqrt(len(buckets))
        assert score == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert any(score != text.bias for score in text.scores(batch))  # the weights are not all zero
