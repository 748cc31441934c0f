"""Deterministic token counting and text generation for the emulator.

No real tokenizer is loaded (no weights may be fetched here), so the emulator counts tokens
with one documented rule, close to cl100k_base on English text (~4 characters per token):

* a run of up to 6 letters, with an optional leading space, is one token;
* a run of up to 3 digits, with an optional leading space, is one token;
* any other non-space character, with an optional leading space, is one token;
* a run of whitespace that does not lead a word is one token.

Token ids are the CRC-32 of the token text modulo the vocabulary size, so they are stable
across processes (prefix caching keys on them). Generated replies are words of at most six
letters with a leading space: a reply of N tokens re-counts as exactly N tokens.
"""

from __future__ import annotations

import re
import zlib

VOCAB_SIZE = 128_256
_TOKEN_RE = re.compile(r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")

# Short words, each one token under the rule above.
_WORDS = """
the of and to in is that for it as with was on be by at this are from or an have not they
which one you had but all were we when there can more if no out so said what up its about
into than them only other new some could time these two may then do first any my now such
like our over man me even most made after also did many before must back years where much
your way well down should each just those people how too little state good very make world
still own see men work long get here both life being under never day same know while last
might us great old year off come since go came right used take
""".split()
OUTPUT_PIECES: tuple[str, ...] = tuple(" " + w for w in _WORDS)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into token strings (see the module docstring for the rule)."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def token_ids(text: str) -> list[int]:
    crc = zlib.crc32
    return [crc(t.encode()) % VOCAB_SIZE for t in _TOKEN_RE.findall(text)]


def piece_for(seed: int, index: int) -> str:
    """The ``index``-th generated token of a reply seeded by ``seed`` (deterministic)."""
    return OUTPUT_PIECES[(seed * 2654435761 + index * 40503) % len(OUTPUT_PIECES)]


def piece_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) % VOCAB_SIZE


def block_hashes(ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full ``block_size`` blocks of ``ids`` (the prefix-cache keys)."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, *ids[start : start + block_size]))
        hashes.append(parent)
    return hashes


def render_chat(messages: list[dict]) -> str:
    """Render chat messages the way a Llama-3-style template would, for counting and hashing."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role', 'user')}|>\n{content or ''}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)
