"""Pure featurisation of a request: hashed n-grams of the prompt window plus cheap structural cues.

Nothing here depends on a trained model. ``PromptFeatures`` is what the sample store keeps and
what training consumes, so offline training, serving and online retraining see identical inputs.
Work is bounded: n-grams and regexes read only :func:`text.window`; the full text is only
measured with C-level ``len``/``str.count``.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .text import split_prompt, window

FEATURE_SPEC_VERSION = 5  # bump whenever a feature's definition, order or hashing changes

WORD_BITS = 18
CHAR_BITS = 18
WORD_DIM = 1 << WORD_BITS
CHAR_DIM = 1 << CHAR_BITS
NGRAM_DIM = WORD_DIM + CHAR_DIM  # char buckets live after the word buckets
CHAR_WINDOW = 768  # char n-grams read the first CHAR_WINDOW chars of the word window only
_MASK64 = (1 << 64) - 1

_WORD_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9]")
_NUMBER = r"(\d{1,5}|an?|one|two|three|four|five|six|seven|eight|nine|ten|twelve|fifteen|twenty|fifty|hundred)"
_REQ_RE = re.compile(
    _NUMBER + r"[\s-]+(?:\w+[\s-]+)?(words?|sentences?|paragraphs?|lines?|pages?|"
    r"bullet(?:s| points?)?|points?|items?|examples?|tips|ideas|ways|steps|questions|names|"
    r"reasons|facts|things|options|suggestions|titles|slogans|tweets?|haikus?|verses?|stanzas?|characters?)\b"
)
_NUM_WORDS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "fifty": 50,
    "hundred": 100,
}
_UNIT_GROUP = {
    "word": 0,
    "character": 0,
    "sentence": 1,
    "line": 1,
    "tweet": 1,
    "haiku": 1,
    "verse": 2,
    "stanza": 2,
    "paragraph": 2,
    "page": 2,
}  # anything else counts as items
_UPPER_DIGIT = re.compile(r"[A-Z0-9]")
SCAN_CHARS = 65_536
_LIST_RE = re.compile(r"(?m)^\s*(?:[-*\u2022]|\d{1,3}[.)])\s+")
_BRIEF = (
    "brief",
    "short",
    "concise",
    "one word",
    "single word",
    "yes or no",
    "one sentence",
    "a sentence",
    "tl;dr",
    "summar",
    "just the",
    "only the",
    "classify",
    "true or false",
    "which of",
    "answer:",
    "output:",
    "label",
    "rate ",
    "correct the",
    "translate",
    "rewrite",
    "paraphrase",
)
_LONG = (
    "essay",
    "story",
    "article",
    "blog",
    "detailed",
    "in detail",
    "step by step",
    "step-by-step",
    "guide",
    "explain",
    "describe",
    "plan",
    "outline",
    "letter",
    "email",
    "speech",
    "script",
    "lyrics",
    "poem",
    "review",
    "compare",
    "pros and cons",
    "tutorial",
    "recipe",
    "itinerary",
    "report",
)
_CODE = ("code", "function", "python", "javascript", "program", "sql", "implement", "algorithm", "c++", "java", "html")
_WH = {"what", "who", "when", "where", "which", "whose", "whom"}
_YESNO = {"is", "are", "do", "does", "did", "can", "could", "will", "would", "should", "was", "were", "has", "have"}
_HOW = {"how", "why"}
_WRITE = {"write", "create", "generate", "compose", "draft", "design", "develop", "make", "give", "provide", "suggest"}
_EXPLAIN = {"explain", "describe", "discuss", "tell", "compare", "analyze", "analyse", "elaborate"}
_LISTV = {"list", "name", "enumerate", "brainstorm"}
_SHORTV = {
    "classify",
    "identify",
    "find",
    "choose",
    "select",
    "determine",
    "correct",
    "rewrite",
    "translate",
    "convert",
}

CUE_NAMES: tuple[str, ...] = (
    "log_prompt_tokens",
    "log_instr_chars",
    "log_context_chars",
    "n_messages",
    "has_system",
    "n_lines",
    "n_questions",
    "has_code_fence",
    "n_list_items",
    "req_words",
    "req_sentences",
    "req_paragraphs",
    "req_items",
    "brief_cues",
    "long_cues",
    "code_cues",
    "first_word_class",
    "ends_with_question",
    "n_window_words",
    "has_input_block",
    "frac_upper_digits",
)
PARAM_NAMES: tuple[str, ...] = ("log_max_tokens", "temperature", "slo_class", "tenant")


def stable_hash(value: str) -> int:
    """CRC-32: stable across processes and replicas (Python's ``hash`` is salted per process)."""
    return zlib.crc32(value.encode("utf-8", "surrogatepass"))


def _category(value: str | None) -> float:
    """A small stable integer for a categorical string (LightGBM categorical), NaN when unset."""
    return float(stable_hash(value) % 1021) if value else math.nan


FIRST_LINE_CHARS = 300
_FIRST_SALT = 0x5BD1E995


_HASH_CACHE: dict[str, int] = {}
_HASH_CACHE_MAX = 200_000  # words repeat across requests; the cache is cleared when full (bounded memory)


def _hashes(tokens: list[str]) -> list[int]:
    cache = _HASH_CACHE
    out = []
    for t in tokens:
        h = cache.get(t)
        if h is None:
            if len(cache) >= _HASH_CACHE_MAX:
                cache.clear()
            h = cache[t] = zlib.crc32(t.encode("utf-8", "surrogatepass"))
        out.append(h)
    return out


def word_buckets(win: str, tokens: list[str] | None = None) -> np.ndarray:
    """Hashed word unigrams and bigrams of the window, plus the first line's in their own namespace.

    The first line is usually the task ("Rewrite the sentence...", "Write a story..."); what follows
    is often pasted input whose words say little about the reply's length.
    """
    if tokens is None:
        tokens = _WORD_RE.findall(win)
    first = _WORD_RE.findall(win[:FIRST_LINE_CHARS].split("\n", 1)[0]) if tokens else []
    out = _ngram_buckets(_hashes(tokens), 0)
    out += _ngram_buckets(_hashes(first), _FIRST_SALT)
    return np.array(out, dtype=np.int64)


def _ngram_buckets(hashes: list[int], salt: int) -> list[int]:
    mask = WORD_DIM - 1
    uni = [(h ^ salt) & mask for h in hashes]
    bi = [(((a ^ salt) * 1000003) ^ (b + 0x9E3779B9)) & mask for a, b in itertools.pairwise(hashes)]
    return uni + bi


def char_buckets(win: str) -> np.ndarray:
    """Hashed character 3-, 4- and 5-gram buckets of the window's first bytes (vectorised rolling hash).

    Each longer n-gram extends the shorter one's hash by one byte, so all three orders cost a
    handful of numpy operations whatever the window size.
    """
    a = np.frombuffer(win[:CHAR_WINDOW].encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.uint64)
    if len(a) < 3:
        return np.zeros(0, dtype=np.int64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        h = (a[:-1] * prime ^ a[1:]) * prime
        parts = []
        for n in (3, 4, 5):
            if len(a) < n:
                break
            h = (h[:-1] ^ a[n - 1 :]) * prime
            parts.append(h ^ np.uint64(n))
        out = np.concatenate(parts) * np.uint64(0x9E3779B97F4A7C15)
    return (out >> np.uint64(64 - CHAR_BITS)).astype(np.int64) + WORD_DIM


REQ_CHARS = 600  # length requests sit in the instruction itself


def _requested(win: str) -> tuple[float, float, float, float]:
    """Numbers the prompt asks for: (words, sentences, paragraphs, items); NaN when not asked."""
    found = [math.nan, math.nan, math.nan, math.nan]
    for num, unit in _REQ_RE.findall(win[:REQ_CHARS]):
        n = float(num) if num.isdigit() else float(_NUM_WORDS.get(num, 1))
        stem = unit.rstrip("s")
        group = _UNIT_GROUP.get(stem.split()[0] if " " in stem else stem, 3)
        if group == 0 and unit.startswith("character"):
            n = n / 5.0  # characters -> roughly words
        if math.isnan(found[group]):
            found[group] = n
    return found[0], found[1], found[2], found[3]


def _first_word_class(words: list[str]) -> float:
    if not words:
        return 0.0
    w = words[0]
    for cls, vocab in enumerate((_WH, _YESNO, _HOW, _WRITE, _EXPLAIN, _LISTV, _SHORTV), start=1):
        if w in vocab:
            return float(cls)
    return 8.0 if w.isalpha() else 0.0


@dataclass(slots=True)
class PromptFeatures:
    """Everything the models need from one request; picklable and model-independent."""

    words: np.ndarray  # hashed word n-gram buckets
    chars: np.ndarray  # hashed char n-gram buckets (offset by WORD_DIM)
    cues: list[float]  # CUE_NAMES
    params: list[float]  # PARAM_NAMES
    model: str
    prompt_tokens: float  # given or estimated (for the llm-d baseline and features)


def featurise(
    prompt: Any,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    slo_class: str | None = None,
    tenant: str | None = None,
    prompt_tokens_estimate: int | None = None,
) -> PromptFeatures:
    """Features of one request from the prompt (string or chat messages) and its parameters."""
    instr, context_chars, n_messages, has_system = split_prompt(prompt)
    if not isinstance(instr, str):
        instr = str(instr)
    total_chars = len(instr) + context_chars
    if prompt_tokens_estimate is None or prompt_tokens_estimate < 0:
        prompt_tokens_estimate = max(1, total_chars // 4)
    win = window(instr).lower()
    words = _WORD_RE.findall(win)
    alpha_words = [w for w in words[:64] if w[0].isalnum()]
    req_w, req_s, req_p, req_i = _requested(win)
    head = instr[:SCAN_CHARS]  # counts read at most SCAN_CHARS; total length comes from len()
    n_upper_digit = len(_UPPER_DIGIT.findall(instr, 0, 256))
    cues = [
        math.log1p(prompt_tokens_estimate),
        math.log1p(len(instr)),
        math.log1p(context_chars),
        float(n_messages),
        float(has_system),
        float(head.count("\n")),
        float(head.count("?")),
        float("```" in head),
        float(len(_LIST_RE.findall(win))),
        req_w,
        req_s,
        req_p,
        req_i,
        float(sum(map(win.__contains__, _BRIEF))),
        float(sum(map(win.__contains__, _LONG))),
        float(sum(map(win.__contains__, _CODE))),
        _first_word_class(alpha_words),
        float(instr[-64:].rstrip().endswith("?")),
        float(len(words)),
        float("\n\n" in win or "input:" in win or ":\n" in win),
        n_upper_digit / max(1, min(len(instr), 256)),
    ]
    params = [
        math.log1p(max_tokens) if max_tokens and max_tokens > 0 else math.nan,
        float(temperature) if temperature is not None else math.nan,
        _category(slo_class),
        _category(tenant),
    ]
    return PromptFeatures(
        words=word_buckets(win, words),
        chars=char_buckets(win),
        cues=cues,
        params=params,
        model=model or "",
        prompt_tokens=float(prompt_tokens_estimate),
    )
