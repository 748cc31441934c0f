"""The compiled n-gram hashing (``_ngrams.c``) computes exactly what the numpy definition computes.

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
    _window_ngrams_compiled,
    _window_ngrams_numpy,
    featurise,
)
from sloproxy.predictor.text import window

compiled = pytest.mark.skipif(features._compiled_ngrams is None, reason="the C extension was not built here")


def _assert_same(wb: bytes) -> None:
    words_a, chars_a, n_a, first_a, hits_a = _window_ngrams_numpy(wb)
    words_b, chars_b, n_b, first_b, hits_b = _window_ngrams_compiled(wb)
    assert words_b.dtype == words_a.dtype == np.int64 and chars_b.dtype == chars_a.dtype == np.int64
    assert np.array_equal(words_a, words_b), wb
    assert np.array_equal(chars_a, chars_b), wb
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
