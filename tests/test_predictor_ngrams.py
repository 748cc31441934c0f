"""The compiled n-gram hashing and text score (``_ngrams.c``) compute exactly what the numpy
definitions compute.

The proxy featurises with the compiled version when it was built; training, tests and machines
without a C compiler may use the numpy one, so the two must agree to the bit on every input.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sloproxy.predictor import features
from sloproxy.predictor.features import (
    CHAR_WINDOW,
    CUE_NAMES,
    FIRST_LINE_BYTES,
    PromptFeatures,
    _window_ngrams_compiled,
    _window_ngrams_numpy,
    featurise,
)
from sloproxy.predictor.serving import LengthPredictor
from sloproxy.predictor.text import window
from sloproxy.predictor.textmodel import TextModel

compiled = pytest.mark.skipif(features._compiled_ngrams is None, reason="the C extension was not built here")


def _assert_same(wb: bytes) -> None:
    words_a, chars_a, n_a, first_a, hits_a = _window_ngrams_numpy(wb)
    words_b, chars_b, n_b, first_b, hits_b = _window_ngrams_compiled(wb)
    assert type(words_b) is type(words_a) is bytes and type(chars_b) is type(chars_a) is bytes
    assert words_a == words_b, wb
    assert chars_a == chars_b, wb
    assert (n_a, first_a, hits_a) == (n_b, first_b, hits_b), wb


def test_the_extension_is_built_wherever_a_compiler_was_there() -> None:
    """``setup.py`` marks the extension optional so installs without a compiler still work; this
    keeps a broken build from passing unnoticed where one should have succeeded."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which(compiler) is None or not headers.exists():
        assert features.window_ngrams is _window_ngrams_numpy
    else:
        assert features._compiled_ngrams is not None, "pip install -e . should have built sloproxy/predictor/_ngrams.c"
        assert features.window_ngrams is _window_ngrams_compiled


@compiled
@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"a",
        b"ab",
        b"abc",
        b"abcd",
        b"   \t\n ",
        b"\n",
        b"hi",
        b"write a poem, please!\nabout cats' whiskers.",
        b"caf\xc3\xa9 ok...",
        b"a\x01b\x7fc d\x0be\x0cf\rg",  # control bytes stay inside words; \x0b \x0c \r split
        b"UPPER Case: ascii capitals are punctuation here",
        b"x" * (FIRST_LINE_BYTES - 1) + b"\nsecond line",
        b"x" * FIRST_LINE_BYTES + b" tail",  # a token across the first line's byte limit
        b"word " * 100 + b"\nnext",  # the first line is cut at FIRST_LINE_BYTES
        b"(" * (CHAR_WINDOW + 50),  # all punctuation, longer than the char window
        b"essay in 500 words, three short paragraphs; ten ideas. write a python function.",
    ],
)
def test_edge_cases_agree(text: bytes) -> None:
    _assert_same(text)


@compiled
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200) | st.text(alphabet=" \n\t.,!?'abcXYZ019é-:", max_size=1200).map(str.encode))
def test_arbitrary_bytes_agree(text: bytes) -> None:
    _assert_same(text)


@compiled
def test_every_shared_prompt_featurises_identically(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole featurisation of the real prompts, both ways: features identical, cues included."""
    lines = (shared_data / "lengths" / "alpaca_eval_prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["instruction"] for line in lines]
    assert len(prompts) > 500
    cue_hits = 0
    for prompt in prompts:
        _assert_same(window(prompt).lower().encode("utf-8", "surrogatepass"))
        fast = featurise([{"role": "user", "content": prompt}], "m", 512)
        with monkeypatch.context() as patch:
            patch.setattr(features, "window_ngrams", _window_ngrams_numpy)
            reference = featurise([{"role": "user", "content": prompt}], "m", 512)
        assert np.array_equal(fast.words, reference.words) and np.array_equal(fast.chars, reference.chars)
        assert np.array_equal(fast.cues, reference.cues, equal_nan=True), prompt
        assert fast.params == reference.params or np.array_equal(fast.params, reference.params, equal_nan=True)
        cue_hits += fast.cues[CUE_NAMES.index("long_cues")] > 0
    assert cue_hits > 50  # the prompts exercise the cue path, not only the hashing


# ----- the text score ---------------------------------------------------------------------------


def _score_both(word_ids: np.ndarray, char_ids: np.ndarray, weights: np.ndarray, bias: float) -> tuple[float, float]:
    model = TextModel(weights, bias)
    f = PromptFeatures(word_ids.astype(np.int64).tobytes(), char_ids.astype(np.int64).tobytes(), [], [], "m", 1.0)
    return model.score(f), model.score_numpy(f)


@compiled
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 255, 256, 257, 1000, 1031, 4099])
def test_the_compiled_text_score_sums_in_numpys_order(n: int) -> None:
    """Block sizes around numpy's pairwise cut-offs (8 accumulators, blocks of 128, halving above),
    with weights spread over ten orders of magnitude so any other order would round differently."""
    rng = np.random.default_rng(n)
    for _ in range(5):
        weights = rng.standard_normal(3000) * 10.0 ** rng.uniform(-5, 5, 3000)
        words, chars = rng.integers(0, 3000, n), rng.integers(0, 3000, n // 3 + 1)
        fast, reference = _score_both(words, chars, weights, float(rng.standard_normal()))
        assert fast == reference


@compiled
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 63), max_size=300),
    st.lists(st.integers(0, 63), max_size=300),
    st.lists(st.floats(allow_nan=False, width=64), min_size=64, max_size=64),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_the_compiled_text_score_equals_numpys_on_any_weights(
    words: list[int], chars: list[int], weights: list[float], bias: float
) -> None:
    fast, reference = _score_both(np.array(words), np.array(chars), np.array(weights), bias)
    assert fast == reference or (np.isnan(fast) and np.isnan(reference))  # inf - inf is NaN both ways
    assert np.signbit(fast) == np.signbit(reference)


@compiled
def test_a_sum_of_negative_zeros_is_positive_zero_as_in_numpy() -> None:
    for n in (1, 8, 200):
        fast, reference = _score_both(np.zeros(n), np.zeros(0), np.array([-0.0]), -0.0)
        assert fast == reference == 0.0 and not np.signbit(fast) and not np.signbit(reference)


@compiled
def test_the_compiled_text_score_refuses_buckets_outside_the_weights() -> None:
    model = TextModel(np.ones(10), 0.0)
    for bad in (10, -1):
        f = PromptFeatures(np.array([1, bad], dtype=np.int64).tobytes(), b"", [], [], "m", 1.0)
        with pytest.raises(ValueError, match="outside the 10 weights"):
            model.score(f)
    with pytest.raises(ValueError, match="whole int64"):
        model.score(PromptFeatures(b"\x00" * 12, b"", [], [], "m", 1.0))


@compiled
def test_the_packaged_models_text_score_is_unchanged_on_every_shared_prompt(shared_data: Path) -> None:
    text = LengthPredictor.load().bundle.text
    lines = (shared_data / "lengths" / "alpaca_eval_prompts.jsonl").read_text().splitlines()
    for line in lines:
        f = featurise([{"role": "user", "content": json.loads(line)["instruction"]}], "m", 512)
        assert text.score(f) == text.score_numpy(f)
