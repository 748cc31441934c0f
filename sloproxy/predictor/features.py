"""Pure featurisation of a request: hashed n-grams of the prompt window plus cheap structural cues.

Nothing here depends on a trained model. ``PromptFeatures`` is what the sample store keeps and
what training consumes, so offline training, serving and online retraining see identical inputs.

Runs inline on the proxy's event loop for every request, so every step is a handful of C-level
calls over a bounded window (no per-character or per-token Python loop on the common path):
the window's UTF-8 bytes are tokenised with ``bytes.translate`` + ``split``, words are hashed
with CRC-32 (cached), n-gram buckets are combined with numpy, character n-grams are read as
unaligned little-endian integers straight from the bytes, and the lexical cues are found by
one table gather over the word n-gram buckets. The full text is only measured with
``len``/``str.count``. That numpy code is the definition; where the package was built with a C
compiler, ``_ngrams.c`` computes the same n-grams and cue candidates in one pass (``window_ngrams``).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .text import closing_request, split_prompt, window

FEATURE_SPEC_VERSION = 7  # bump whenever a feature's definition, order or hashing changes

WORD_BITS = 18
CHAR_BITS = 18
WORD_DIM = 1 << WORD_BITS
CHAR_DIM = 1 << CHAR_BITS
NGRAM_DIM = WORD_DIM + CHAR_DIM  # char buckets live after the word buckets
CHAR_WINDOW = 768  # char n-grams read the first CHAR_WINDOW bytes of the (lower-cased) window only
FIRST_LINE_BYTES = 300  # the first-line namespace reads at most this much of the window
SCAN_CHARS = 65_536  # newline / question-mark / fence counts read at most this much of the instruction

# Word tokens: runs of [a-z0-9'] and non-ASCII bytes; every other printable ASCII byte is a token of its own.
_WORDISH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789' \t\n\r\x0b\x0c") | frozenset(range(128, 256))
_NOT_PUNCT = bytes(b for b in range(256) if b in _WORDISH or b < 0x21 or b == 0x7F)
_SPACED = {b: b" " + bytes([b]) + b" " for b in range(256) if b not in _NOT_PUNCT}
_NOT_UPPER_DIGIT = bytes(b for b in range(256) if not (0x41 <= b <= 0x5A or 0x30 <= b <= 0x39))


def _U64(value: int) -> np.ndarray:
    """A uint64 constant as a 0-d array: numpy combines it with an array in about half the time of an
    ``np.uint64`` scalar (converted on every call: 0.9 against 1.5 µs measured), same arithmetic."""
    return np.array(value, dtype=np.uint64)


_WORD_MASK = _U64(WORD_DIM - 1)
_BIGRAM_MUL = _U64(1_000_003)
_BIGRAM_ADD = _U64(0x9E3779B9)
_FIRST_SALT = _U64(0x5BD1E995)
_WORD_OFFSET = _U64(WORD_DIM)
# char n-grams: the n bytes at each position (little-endian), multiply-shift hashed per order
_CHAR_MASKS = np.array([[(1 << 24) - 1], [(1 << 32) - 1], [(1 << 40) - 1]], dtype=np.uint64)
_CHAR_MULS = np.array([[0x9E3779B97F4A7C15], [0xC2B2AE3D27D4EB4F], [0x165667B19E3779F9]], dtype=np.uint64)
_CHAR_SHIFT = _U64(64 - CHAR_BITS)
_PAD = b"\0" * 8

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
_UNITS = (
    *(
        f"{u}{s}"
        for u in ("word", "character", "sentence", "line", "tweet", "haiku", "verse", "stanza")
        for s in ("", "s")
    ),
    *(f"{u}{s}" for u in ("paragraph", "page", "bullet", "point", "item", "example") for s in ("", "s")),
    *("tips", "ideas", "ways", "steps", "questions", "names", "reasons", "facts", "things", "options"),
    *("suggestions", "titles", "slogans"),
)
_BRIEF = (
    *("brief", "briefly", "short", "shorter", "concise", "concisely", "summary", "summarize", "summarise"),
    *("summarized", "summarization", "classify", "label", "labels", "translate", "rewrite", "paraphrase", "rate"),
    *("one word", "single word", "or no", "one sentence", "a sentence", "tl ;", "just the", "only the"),
    *("or false", "which of", "correct the", "answer :", "output :"),
)
_LONG = (
    *("essay", "story", "stories", "article", "blog", "detailed", "guide", "explain", "describe", "plan"),
    *("outline", "letter", "email", "speech", "script", "lyrics", "poem", "review", "compare", "tutorial"),
    *("recipe", "itinerary", "report", "in detail", "by step", "- by", "and cons", "essays", "articles", "blogs"),
    *("guides", "plans", "outlines", "letters", "emails", "speeches", "scripts", "poems", "reviews"),
    *("tutorials", "recipes", "reports", "explanation", "description", "detail"),
)
_CODE = (
    *("code", "function", "python", "javascript", "program", "sql", "implement", "algorithm", "java", "html"),
    *("functions", "programs", "programming", "algorithms", "implementation", "coding"),
)
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
_FIRST_WORD_CLASS = {
    w.encode(): float(cls)
    for cls, vocab in reversed(list(enumerate((_WH, _YESNO, _HOW, _WRITE, _EXPLAIN, _LISTV, _SHORTV), start=1)))
    for w in vocab
}  # reversed: a word in two vocabularies keeps the lower class
_LIST_RE = re.compile(r"\n[ \t]*(?:[-*\u2022]|\d{1,3}[.)])[ \t]")  # literal "\n" prefix: the regex skips fast
_LIST_START = re.compile(r"[ \t]*(?:[-*\u2022]|\d{1,3}[.)])[ \t]")

CUE_NAMES: tuple[str, ...] = (
    "log_request_tokens",
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


_CATEGORY_CACHE: dict[str, float] = {}


def _category(value: str | None) -> float:
    """A small stable integer for a categorical string (LightGBM categorical), NaN when unset."""
    if not value:
        return math.nan
    c = _CATEGORY_CACHE.get(value)
    if c is None:
        c = float(stable_hash(value) % 1021)
        if len(_CATEGORY_CACHE) < 1024:  # bounded: client-chosen strings are unbounded
            _CATEGORY_CACHE[value] = c
    return c


_HASH_CACHE: dict[bytes, int] = {}
_HASH_CACHE_MAX = 200_000  # words repeat across requests; the cache is cleared when full (bounded memory)


def token_hashes(tokens: list[bytes]) -> np.ndarray:
    """CRC-32 of each token as uint64; cached lookups via ``map`` (C loop), misses hashed on the side."""
    cache = _HASH_CACHE
    try:
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))
    except KeyError:
        if len(cache) + len(tokens) > _HASH_CACHE_MAX:
            cache.clear()
        for t in tokens:
            if t not in cache:
                cache[t] = zlib.crc32(t)
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def tokenize(win_bytes: bytes) -> list[bytes]:
    """Word tokens of the (lower-cased, UTF-8) window, all in C: each distinct punctuation byte
    present (usually a handful) is padded with spaces by one ``bytes.replace``, then ``split``."""
    for b in set(win_bytes.translate(None, _NOT_PUNCT)):
        win_bytes = win_bytes.replace(_SPACED[b][1:2], _SPACED[b])
    return win_bytes.split()


def _first_line_tokens(win_bytes: bytes) -> int:
    """How many of the window's leading tokens start on its first line (read up to FIRST_LINE_BYTES)."""
    return len(tokenize(win_bytes[:FIRST_LINE_BYTES].partition(b"\n")[0]))


def word_hashes(hashes: np.ndarray, n_first: int) -> np.ndarray:
    """Full (unmasked) n-gram hashes: the window's unigrams, the first line's (salted) unigrams, then
    the window's bigrams and the first line's bigrams.

    The first line is usually the task ("Rewrite the sentence...", "Write a story..."); what follows
    is often pasted input whose words say little about the reply's length, so its tokens get their
    own namespace.
    """
    first = hashes[:n_first] ^ _FIRST_SALT
    nxt = hashes[1:] + _BIGRAM_ADD
    return np.concatenate(
        (hashes, first, (hashes[:-1] * _BIGRAM_MUL) ^ nxt, (first[:-1] * _BIGRAM_MUL) ^ nxt[: max(0, n_first - 1)])
    )


def word_buckets_of(full: np.ndarray) -> np.ndarray:
    """Word bucket indices (int64 in [0, WORD_DIM)) of full n-gram hashes."""
    return (full & _WORD_MASK).view(np.int64)


def char_buckets(win_bytes: bytes) -> np.ndarray:
    """Hashed character 3-, 4- and 5-gram buckets of the window's first bytes.

    The n bytes at a position, read as one little-endian integer (an unaligned, stride-1 uint64 view
    of the NUL-padded bytes, masked to n bytes), *are* the n-gram; a per-order multiply-shift hashes
    it. All three orders cost a handful of numpy operations whatever the window size.
    """
    b = win_bytes[:CHAR_WINDOW]
    n = len(b)
    if n < 3:
        return np.zeros(0, dtype=np.int64)
    grams = np.ndarray((n - 2,), dtype="<u8", buffer=b + _PAD, offset=0, strides=(1,))
    h = ((grams & _CHAR_MASKS) * _CHAR_MULS) >> _CHAR_SHIFT  # row k: (k+3)-grams (the last k are partial)
    return (np.concatenate((h[0], h[1, : n - 3], h[2, : n - 4])) + _WORD_OFFSET).view(np.int64)


def _cue_tables() -> tuple[np.ndarray, dict[int, tuple[int, str]]]:
    """Cue phrases as word n-gram hashes: a bucket -> flag table (a cheap gather finds candidates)
    and the full hash -> (group, phrase) map that confirms them (bucket collisions are not cues)."""
    table = np.zeros(WORD_DIM, dtype=np.uint8)
    full: dict[int, tuple[int, str]] = {}
    for group, phrases in enumerate((_BRIEF, _LONG, _CODE, _UNITS)):
        for phrase in phrases:
            toks = tokenize(phrase.encode())
            h = token_hashes(toks)
            value = int(h[0]) if len(toks) == 1 else int((h[0] * _BIGRAM_MUL) ^ (h[1] + _BIGRAM_ADD))
            full[value] = (group, phrase)
            table[value & (WORD_DIM - 1)] = 1
    return table, full


_CUE_TABLE, _CUE_FULL = _cue_tables()

# (word buckets, char buckets, number of word tokens, first token, cue candidates as (position, full hash));
# the buckets are int64 arrays' bytes: that is what the compiled pass makes and the text score reads
WindowNgrams = tuple[bytes, bytes, int, bytes | None, list[tuple[int, int]]]


def _window_ngrams_numpy(wb: bytes) -> WindowNgrams:
    """The window's hashed n-grams and cue candidates, with numpy (the reference definition)."""
    tokens = tokenize(wb)
    one_line = len(wb) <= FIRST_LINE_BYTES and b"\n" not in wb  # then the first line's tokens are all of them
    full = word_hashes(token_hashes(tokens), len(tokens) if one_line else _first_line_tokens(wb))
    words = word_buckets_of(full)
    candidates = _CUE_TABLE[words].nonzero()[0]  # not np.flatnonzero: its Python wrapper costs more here
    hits = list(zip(candidates.tolist(), full[candidates].tolist(), strict=True))
    return words.tobytes(), char_buckets(wb).tobytes(), len(tokens), tokens[0] if tokens else None, hits


def _window_ngrams_compiled(wb: bytes) -> WindowNgrams:
    """The same as :func:`_window_ngrams_numpy`, computed in one pass by ``_ngrams.c``."""
    return _compiled_ngrams(wb, _CUE_TABLE)


try:
    from ._ngrams import window_ngrams as _compiled_ngrams
except ImportError:  # installed without a C compiler: the numpy version gives the same features, slower
    _compiled_ngrams = None
window_ngrams = _window_ngrams_numpy if _compiled_ngrams is None else _window_ngrams_compiled


def _cues_and_requests(hits: list[tuple[int, int]], n_tok: int, wb: bytes) -> tuple[list[float], list[float]]:
    """Distinct brief/long/code cue phrases present, and the numbers the prompt asks for.

    Requested lengths ("500 words", "3 short paragraphs", "ten ideas", "a sentence"): a unit word
    preceded by a number, or by a number and one other word; the first request per group counts
    (words, sentences, paragraphs, items). Characters count as a fifth of a word. ``hits`` are the
    cue candidates of :func:`window_ngrams` (position among the word n-grams, full hash); the
    window's tokens ``wb`` are only split again when a unit word needs the words before it.
    """
    counts = [0.0, 0.0, 0.0]
    req = [math.nan, math.nan, math.nan, math.nan]
    if not hits:  # most windows hold no cue candidate at all
        return counts, req
    seen: set[str] = set()
    tokens: list[bytes] | None = None
    for pos, value in hits:
        hit = _CUE_FULL.get(value)
        if hit is None:
            continue
        group, phrase = hit
        if group < 3:
            if phrase not in seen:
                seen.add(phrase)
                counts[group] += 1.0
        elif pos < n_tok:  # a unit word in the window (not the first-line copy)
            if tokens is None:
                tokens = tokenize(wb)
            num = _number(tokens[pos - 1]) if pos >= 1 else None
            if num is None and pos >= 2:
                num = _number(tokens[pos - 2])
            if num is None:
                continue
            stem = phrase[:-1] if phrase.endswith("s") else phrase
            unit = _UNIT_GROUP.get(stem, 3)
            if math.isnan(req[unit]):
                req[unit] = num / 5.0 if stem == "character" else num
    return counts, req


def _number(token: bytes) -> float | None:
    if token.isdigit():
        return float(token) if len(token) <= 5 else None
    n = _NUM_WORDS.get(token.decode("utf-8", "replace"))
    return float(n) if n is not None else None


@dataclass(slots=True)
class PromptFeatures:
    """Everything the models need from one request; picklable and model-independent."""

    word_ids: bytes  # hashed word n-gram buckets, int64 in native order (the text score reads them as they are)
    char_ids: bytes  # hashed char n-gram buckets (offset by WORD_DIM), likewise
    cues: list[float]  # CUE_NAMES
    params: list[float]  # PARAM_NAMES
    model: str
    prompt_tokens: float  # given or estimated (for the llm-d baseline and features)

    @property
    def words(self) -> np.ndarray:
        return np.frombuffer(self.word_ids, dtype=np.int64)

    @property
    def chars(self) -> np.ndarray:
        return np.frombuffer(self.char_ids, dtype=np.int64)


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
    turn, context_chars, n_messages, has_system = split_prompt(prompt)
    if not isinstance(turn, str):
        turn = str(turn)
    instr, _ = closing_request(turn)
    n_chars = len(instr)
    whole_chars = len(turn) + context_chars
    if prompt_tokens_estimate is None or prompt_tokens_estimate < 0:
        prompt_tokens_estimate = max(1, whole_chars // 4)
    # The size cue is the request's own share of the prompt: the training prompts are single requests,
    # so a size that counted history or pasted context would fall outside everything the heads saw
    # (the conv workload's prompts, ~1,000 tokens of context each, ranked at tau ~0 with it).
    request_tokens = prompt_tokens_estimate * n_chars / whole_chars if whole_chars > n_chars else prompt_tokens_estimate
    win = window(instr).lower()
    wb = win.encode("utf-8", "surrogatepass")
    words, chars, n_tokens, first_token, hits = window_ngrams(wb)
    (brief, long_, code), (req_w, req_s, req_p, req_i) = _cues_and_requests(hits, n_tokens, wb)
    n_list = len(_LIST_RE.findall(win)) + (1 if _LIST_START.match(win) else 0)
    head = instr[:256]
    n_upper_digit = len(head.encode("ascii", "ignore").translate(None, _NOT_UPPER_DIGIT))
    cues = [
        math.log1p(request_tokens),
        math.log1p(n_chars),
        math.log1p(context_chars),
        float(n_messages),
        float(has_system),
        float(instr.count("\n", 0, SCAN_CHARS)),
        float(instr.count("?", 0, SCAN_CHARS)),
        float(instr.find("```", 0, SCAN_CHARS) >= 0),
        float(n_list),
        req_w,
        req_s,
        req_p,
        req_i,
        brief,
        long_,
        code,
        _FIRST_WORD_CLASS.get(first_token, 8.0 if first_token.isalpha() else 0.0) if first_token else 0.0,
        float(instr[-64:].rstrip().endswith("?")),
        float(n_tokens),
        float("\n\n" in win or "input:" in win or ":\n" in win),
        n_upper_digit / max(1, len(head)),
    ]
    params = [
        math.log1p(max_tokens) if max_tokens and max_tokens > 0 else math.nan,
        float(temperature) if temperature is not None else math.nan,
        _category(slo_class),
        _category(tenant),
    ]
    return PromptFeatures(words, chars, cues, params, model or "", float(prompt_tokens_estimate))
