"""The documented token-counting rule and generated text that re-counts exactly."""

from __future__ import annotations

from sloproxy.emulator.tokens import (
    OUTPUT_PIECES,
    block_hashes,
    count_tokens,
    piece_for,
    token_ids,
    tokenize,
)


def test_rule_splits_words_digits_and_punctuation():
    assert tokenize("Hello world, internationalization 12345!") == [
        "Hello",
        " world",
        ",",
        " intern",
        "ationa",
        "lizati",
        "on",
        " 123",
        "45",
        "!",
    ]
    assert count_tokens("") == 0
    assert count_tokens("a\n\nb") == 3


def test_english_is_about_four_characters_per_token():
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 50
    assert 3.5 <= len(text) / count_tokens(text) <= 5.5


def test_ids_are_stable_and_in_vocabulary():
    ids = token_ids("Prefix caching keys on token ids.")
    assert ids == token_ids("Prefix caching keys on token ids.")
    assert all(0 <= i < 128_256 for i in ids)


def test_generated_reply_recounts_exactly():
    assert all(count_tokens(piece) == 1 for piece in OUTPUT_PIECES)
    reply = "".join(piece_for(1234, i) for i in range(300))
    assert count_tokens(reply) == 300


def test_block_hashes_chain_full_blocks_only():
    ids = list(range(40))
    hashes = block_hashes(ids, 16)
    assert len(hashes) == 2
    assert block_hashes(list(range(32)) + [99] * 8, 16) == hashes  # same first two blocks
    assert block_hashes([7, *list(range(1, 40))], 16)[1] != hashes[1]  # chained: block 2 depends on block 1
