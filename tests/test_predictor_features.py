"""Featurisation is bounded, total over odd inputs and identical for the same visible text."""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np

from sloproxy.predictor.features import (
    CHAR_BITS,
    CHAR_WINDOW,
    CUE_NAMES,
    NGRAM_DIM,
    PARAM_NAMES,
    WORD_DIM,
    char_buckets,
    featurise,
    tokenize,
)
from sloproxy.predictor.text import HEAD_CHARS, REQUEST_CHARS, TAIL_CHARS, closing_request, split_prompt, window


def _same(a, b) -> bool:
    return np.array_equal(a.words, b.words) and np.array_equal(a.chars, b.chars)


def test_huge_prompt_uses_only_head_and_tail() -> None:
    """A message of a window or less is read whole; a huge one only through its bounded ends."""
    head = "Summarise the following report in three sentences.\n" + "alpha beta gamma " * 20
    tail = "\nWhat is the main finding? " + "delta " * 20
    assert window(head + tail) == head + tail
    middle_a = "x" * 800_000
    middle_b = "lorem ipsum " * 70_000
    assert window(head + middle_a + tail) == window(head + middle_a[:HEAD_CHARS] + tail)
    assert window(head + middle_a + tail) != window(head + middle_b + tail)  # the head window includes some middle
    assert len(window(head + middle_a + tail)) == HEAD_CHARS + 1 + TAIL_CHARS


def test_a_long_message_is_read_from_its_closing_request() -> None:
    """Past the window, a message is context then its request: what the context says does not move
    the n-grams, and the size cue counts the request's share of the prompt, not the context."""
    request = "Summarise the report above in three sentences. What is the main finding?"
    a = featurise("x" * 800_000 + "\n\n" + request, prompt_tokens_estimate=200_000)
    b = featurise("lorem ipsum " * 70_000 + "\n\n" + request, prompt_tokens_estimate=210_000)
    alone = featurise(request)
    assert _same(a, b) and _same(a, alone)
    assert a.cues[CUE_NAMES.index("req_sentences")] == 3.0
    assert a.cues[CUE_NAMES.index("log_request_tokens")] < math.log1p(40)  # ~18 tokens of 200,000
    assert a.prompt_tokens == 200_000.0  # the whole prompt still counts where size matters (baselines)


def test_the_closing_request_is_the_last_paragraph_block_of_a_sentence_or_more() -> None:
    context = "Earlier notes about the quarterly numbers.\n" * 40
    assert closing_request("Short prompt.\n\nWith an input.") == ("Short prompt.\n\nWith an input.", 0)
    text = context + "\n\nTranslate the greeting below into French, keeping its tone.\n\nGood morning"
    request, cut = closing_request(text)  # its short tail ("Good morning") joins the block before
    assert request == "Translate the greeting below into French, keeping its tone.\n\nGood morning"
    assert text[cut:] == request
    no_break = "word " * 400
    assert closing_request(no_break) == (no_break[-REQUEST_CHARS:], len(no_break) - REQUEST_CHARS)


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


_M64 = (1 << 64) - 1


def _py_word_hashes(tokens: list[bytes], n_first: int) -> list[int]:
    """Reference n-gram hashes in plain Python integers (independent of the numpy implementation)."""
    h = [zlib.crc32(t) for t in tokens]
    first = [v ^ 0x5BD1E995 for v in h[:n_first]]

    def bigram(a: int, b: int) -> int:
        return ((a * 1_000_003) & _M64) ^ ((b + 0x9E3779B9) & _M64)

    main = [bigram(a, b) for a, b in itertools.pairwise(h)]
    return h + first + main + [bigram(a, b) for a, b in zip(first, h[1:n_first], strict=False)]


def test_word_buckets_match_reference_hashing() -> None:
    f = featurise("Write a Poem, please!\nAbout cats' whiskers.")
    tokens = [b"write", b"a", b"poem", b",", b"please", b"!", b"about", b"cats'", b"whiskers", b"."]
    assert tokenize(b"write a poem, please!\nabout cats' whiskers.") == tokens  # punctuation: own tokens
    expected = [h & (WORD_DIM - 1) for h in _py_word_hashes(tokens, 6)]  # 6 tokens on the first line
    assert f.words.tolist() == expected
    assert f.words.dtype == np.int64
    assert f.cues[CUE_NAMES.index("n_window_words")] == 10.0
    assert tokenize(b"caf\xc3\xa9 ok...") == [b"caf\xc3\xa9", b"ok", b".", b".", b"."]  # non-ASCII stays in words


def test_char_buckets_are_little_endian_ngrams() -> None:
    b = "ab\u00e9!".encode()  # 5 bytes, one character takes two
    padded = b + b"\0" * 8
    muls = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)
    expected = [
        WORD_DIM + (((int.from_bytes(padded[i : i + n], "little") * mul) & _M64) >> (64 - CHAR_BITS))
        for n, mul in zip((3, 4, 5), muls, strict=True)
        for i in range(len(b) - n + 1)
    ]
    assert len(expected) == 3 + 2 + 1
    assert char_buckets(b).tolist() == expected
    assert char_buckets(b"").tolist() == []
    long = ("x" * 2000).encode()
    assert len(char_buckets(long)) == 3 * CHAR_WINDOW - 9  # bounded window: (n-2)+(n-3)+(n-4)


def test_cues_on_hand_made_prompts() -> None:
    cue = CUE_NAMES.index
    f = featurise("Briefly summarize this in one sentence. Keep it short and brief.")
    assert f.cues[cue("brief_cues")] == 5.0  # briefly, summarize, one sentence, short, brief (distinct)
    assert f.cues[cue("req_sentences")] == 1.0 and math.isnan(f.cues[cue("req_words")])
    assert f.cues[cue("first_word_class")] == 8.0  # an alphabetic word outside the verb classes
    g = featurise("Write a detailed, step-by-step Python tutorial: 10 tips and a 300-character summary.")
    assert g.cues[cue("long_cues")] == 3.0  # detailed, step-by-step, tutorial
    assert g.cues[cue("code_cues")] == 1.0  # python
    assert g.cues[cue("req_items")] == 10.0 and g.cues[cue("req_words")] == 60.0  # 300 characters ~ 60 words
    assert g.cues[cue("first_word_class")] == 4.0  # write
    h = featurise("What are five-paragraph essays?\n- one\n- two\n3. three\n  * four")
    assert h.cues[cue("req_paragraphs")] == 5.0 and h.cues[cue("first_word_class")] == 1.0
    assert h.cues[cue("n_list_items")] == 4.0 and h.cues[cue("n_lines")] == 4.0
    assert h.cues[cue("long_cues")] == 1.0 and h.cues[cue("brief_cues")] == 0.0
    assert featurise("List 7 reasons for tea").cues[cue("req_items")] == 7.0
    assert featurise("- item\nx").cues[cue("n_list_items")] == 1.0  # a list item on the first line
    u = featurise("ABC 12 de?")
    assert u.cues[cue("frac_upper_digits")] == 5 / 10 and u.cues[cue("ends_with_question")] == 1.0
