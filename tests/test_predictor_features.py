"""Featurisation is bounded, total over odd inputs and identical for the same visible text."""

from __future__ import annotations

import math

import numpy as np

from sloproxy.predictor.features import CUE_NAMES, NGRAM_DIM, PARAM_NAMES, featurise
from sloproxy.predictor.text import HEAD_CHARS, TAIL_CHARS, split_prompt, window


def _same(a, b) -> bool:
    return np.array_equal(a.words, b.words) and np.array_equal(a.chars, b.chars)


def test_huge_prompt_uses_only_head_and_tail() -> None:
    head = "Summarise the following report in three sentences.\n" + "alpha beta gamma " * 60
    tail = "\nWhat is the main finding? " + "delta " * 60
    middle_a = "x" * 800_000
    middle_b = "lorem ipsum " * 70_000
    a = featurise(head + middle_a + tail)
    b = featurise(head + middle_b + tail)
    assert _same(a, b)  # n-grams see the same window whatever sits in the middle
    assert len(a.words) <= 2 * (HEAD_CHARS + TAIL_CHARS)
    assert window(head + middle_a + tail) == window(head + middle_b + tail)
    assert a.cues[CUE_NAMES.index("req_sentences")] == 3.0


def test_odd_inputs_do_not_raise() -> None:
    for prompt in [
        "",
        " ",
        "\x00\x01\ufffd",
        "日本語のテキスト\uff1f",
        "\ud800 lone surrogate",
        "🙂" * 5000,
        None,
        [],
        [{}],
    ]:
        f = featurise(prompt, None, None, None, None, None, None)
        assert len(f.cues) == len(CUE_NAMES) and len(f.params) == len(PARAM_NAMES)
        assert all(0 <= i < NGRAM_DIM for i in f.words) and all(0 <= i < NGRAM_DIM for i in f.chars)
        assert all(isinstance(v, float) for v in f.cues)


def test_chat_messages_use_last_user_turn() -> None:
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write an essay."},
        {"role": "assistant", "content": "..."},
        {"role": "user", "content": [{"type": "text", "text": "Now a haiku."}, {"type": "image_url"}]},
    ]
    instr, context_chars, n, has_system = split_prompt(msgs)
    assert instr == "Now a haiku." and n == 4 and has_system and context_chars > 0
    assert _same(featurise(msgs), featurise("Now a haiku."))


def test_params_and_requested_lengths() -> None:
    f = featurise("Write 500 words about tea, in 3 paragraphs.", "m", 256, 0.2, "batch", "acme", 12)
    assert f.cues[CUE_NAMES.index("req_words")] == 500.0
    assert f.cues[CUE_NAMES.index("req_paragraphs")] == 3.0
    assert f.params[0] == math.log1p(256) and f.params[1] == 0.2
    assert f.prompt_tokens == 12.0 and f.model == "m"
    g = featurise("Write 500 words about tea, in 3 paragraphs.", "m", 256, 0.2, "batch", "acme", 12)
    assert _same(f, g) and f.params == g.params  # stable hashing: same input, same buckets
