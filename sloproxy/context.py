"""Context windows: how many tokens each backend holds, and what its engine does with a request over it.

A mixed fleet has unlike windows (a 4,096-token TGI beside an 8,192-token vLLM), and each engine
treats a request that does not fit its own way (the rules are read from the engines' sources and
cited in ``tests/test_contract_*.py``): vLLM 0.33 refuses a prompt longer than its window but
clamps prompt + ``max_tokens`` to it; SGLang and TGI refuse both. Before a request queues, the
proxy works out per backend of its model whether it fits whole, fits once its reply limit is
clamped (by the engine, or by the proxy where the engine would refuse), or not at all; it then
routes only where the request fits, whole where a backend holds it whole, and answers a request that
no backend holds with a 400 ``context_length_exceeded`` naming the largest window.

The prompt's size is not known before an engine tokenises it, so the proxy brackets it
(:func:`prompt_size`): an upper bound that undercounted would send a prompt to a window too small
for it. Where an engine refuses anyway (a window learned late, an unusual tokenizer), its message
names its count; the forwarder reads it (:func:`refused_prompt_tokens`) and places the request again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal

from .errors import ProxyError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .backends import Backend
    from .request import ProxyRequest

CLAMP_HEADER = "x-sloproxy-max-tokens-clamped"  # reply header: the reply limit the engine was sent
CONTEXT_CODE = "context_length_exceeded"  # OpenAI's code for a request longer than the model's window


class Fit(IntEnum):
    """How a request fits one backend's window (lower is better)."""

    WHOLE = 0  # the prompt and the requested reply fit
    CLAMPED = 1  # the prompt fits; the reply limit is cut to the room left
    NONE = 2  # the prompt does not fit (or the reply limit would have to be cut and may not be)


@dataclass(frozen=True, slots=True)
class ContextWindow:
    """One backend's window in tokens, as its engine reports it or the config states it."""

    total: int  # prompt + reply (vLLM max_model_len, SGLang context_length, TGI max_total_tokens)
    max_input: int | None = None  # a bound on the prompt alone (TGI max_input_tokens)
    source: Literal["engine", "config"] = "engine"

    @property
    def prompt_limit(self) -> int:
        """The longest prompt the window takes with room for one reply token."""
        limit = self.total - 1
        return limit if self.max_input is None else min(limit, self.max_input)


@dataclass(frozen=True, slots=True)
class LengthRule:
    """One engine's treatment of ``prompt + max_tokens`` over its window: ``refuse`` answers 400,
    ``clamp`` runs the request with the reply limit cut to the room left (vLLM 0.33, which still refuses
    a ``max_tokens`` larger than the whole window). A prompt that leaves no room for a reply token is
    refused by every engine."""

    over_window: Literal["refuse", "clamp"]
    # TGI checks only the first ``checked_reply`` reply tokens against the window (it generates in rounds
    # of that many and ends with ``length`` when the next round no longer fits). None: all of them.
    checked_reply: int | None = None


def fit(
    rule: LengthRule, window: ContextWindow, prompt: int, requested: int | None, clamp: bool
) -> tuple[Fit, int | None]:
    """How a request of ``prompt`` tokens asking for ``requested`` reply tokens (None: the engine's
    default, which is at most the room left) fits ``window``; with the reply limit the proxy must send
    when it clamps (None: the client's stands)."""
    if prompt > window.prompt_limit:
        return Fit.NONE, None
    room = window.total - prompt
    if requested is None or requested <= room:
        return Fit.WHOLE, None
    checked = requested if rule.checked_reply is None else min(requested, rule.checked_reply)
    if (rule.over_window == "clamp" and requested <= window.total) or checked <= room:
        return Fit.CLAMPED, None  # the engine cuts the reply at the window itself
    return (Fit.CLAMPED, room) if clamp else (Fit.NONE, None)


# ----- the prompt's size --------------------------------------------------------------------------

# The upper bound needs no look at the prompt: the tokenizers of Llama 3/4, Mistral and Qwen (measured
# with the tokenizers their PyPI packages ship, chat templates included, on English, code, numbers, JSON,
# eleven languages, emoji and adversarial text) never make more tokens than the text has UTF-8 bytes, and
# the JSON body is longer than the text in it: ``len(body)`` held for every sample, 37 tokens to spare at
# the tightest (docs/architecture.md, "Context windows"). No rule of the form bytes / D + C with D > 1 is
# safe (digits are a token each in Mistral and Qwen; a rare CJK character or an emoji is up to 4 tokens).
# Near a window the prompt is counted by character class (the emulators' rule, emulator/tokens.py): that
# count plus the template is what the emulators see and is the likely size; real tokenizers came to at
# least 0.32 of it on every sample (Russian in Llama 4), so LOW_RATIO of it bounds the size from below.
_PIECES = re.compile(r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")
LOW_RATIO = 0.30
TEMPLATE_TOKENS = 48  # a chat template's fixed tokens (Llama 3.1 adds a dated system block: 35 measured)
MESSAGE_TOKENS = 8  # and per message (role header and end markers)


@dataclass(frozen=True, slots=True)
class PromptSize:
    """What the proxy knows of a prompt's size in an engine's tokens before any engine counted it."""

    low: int  # it is at least this long
    likely: int  # the rule's count with the template: exact for the emulators
    high: int  # it is at most this long (the body's bytes)


def quick_token_bound(request: ProxyRequest) -> int:
    """An upper bound on the prompt's tokens from the body's size alone (nothing parsed)."""
    if request.prompt_token_count is not None:
        return request.prompt_token_count
    return len(request.raw) + TEMPLATE_TOKENS


def prompt_size(request: ProxyRequest) -> PromptSize:
    """The prompt's size in tokens, template included; exact once an engine counted it (its refusal)."""
    if request.prompt_token_count is not None:
        count = request.prompt_token_count
        return PromptSize(count, count, count)
    prompt = request.decoded_body().get("messages" if request.kind == "chat" else "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return PromptSize(len(prompt), len(prompt), len(prompt))  # token ids
    if request.kind == "chat" and isinstance(prompt, list):
        texts, overhead = [_message_text(m) for m in prompt], TEMPLATE_TOKENS + MESSAGE_TOKENS * len(prompt)
    elif isinstance(prompt, list):  # completions: several prompts, one per choice: the longest counts
        texts, overhead = [max((str(p) for p in prompt), key=len, default="")], 0
    else:
        texts, overhead = [str(prompt or "")], 0
    pieces = sum(len(_PIECES.findall(text)) for text in texts)
    return PromptSize(low=int(pieces * LOW_RATIO), likely=pieces + overhead, high=quick_token_bound(request))


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    extra = "".join(str(message.get(k, "")) for k in ("name", "tool_calls", "tool_call_id") if k in message)
    return f"{content or ''}{extra}"


# ----- per request: where it fits ---------------------------------------------------------------------


def place_by_window(request: ProxyRequest, serving: Iterable[Backend], clamp: bool) -> None:
    """Narrow ``request`` to the backends of its model whose window holds it (``request.excluded`` gains
    the others), the best fits only (whole before clamped), and note the reply limit to send where the
    proxy clamps (``request.clamps``).

    Where it surely fits (by the prompt's upper bound) it goes nowhere else. Where no window surely holds
    it, it goes where it likely fits; and if it likely fits nowhere but may (by the lower bound), to the
    largest windows, where the engine's own count decides. Only a request that cannot fit any window
    gets the proxy's 400 (with every window known)."""
    windows = [b for b in serving if b.context is not None]
    if not windows:
        return  # nothing known: the engines' own refusals steer it (reroute_after_refusal)
    requested = request.max_tokens
    quick = quick_token_bound(request)
    if all(_fit(b, quick, requested, clamp) == (Fit.WHOLE, None) for b in windows):
        return  # the common case: even the quick bound fits every window whole
    size = prompt_size(request)
    fits = [(b, *_fit(b, size.high, requested, clamp)) for b in windows]
    if min(verdict for _, verdict, _ in fits) == Fit.NONE:
        fits = [(b, *_fit(b, size.likely, requested, clamp)) for b in windows]
    if min(verdict for _, verdict, _ in fits) == Fit.NONE:
        fits = [(b, *_fit(b, size.low, requested, clamp)) for b in windows]
        if min(verdict for _, verdict, _ in fits) == Fit.NONE:
            if len(windows) == len(serving):
                largest = max((b.context for b in windows), key=lambda window: window.prompt_limit)  # type: ignore[union-attr]
                raise context_error(request, size.low, largest)
            request.excluded.update(b.name for b in windows)  # a backend of unknown window may hold it
            return
        widest = max(b.context.prompt_limit for b, verdict, _ in fits if verdict != Fit.NONE)  # type: ignore[union-attr]
        fits = [(b, v, limit) if b.context.prompt_limit == widest else (b, Fit.NONE, None) for b, v, limit in fits]  # type: ignore[union-attr]
    best = min(verdict for _, verdict, _ in fits)
    clamps: dict[str, int] = {}
    for backend, verdict, limit in fits:
        if verdict > best:
            request.excluded.add(backend.name)
        elif limit is not None:
            clamps[backend.name] = limit
    request.clamps = clamps or None


def _fit(backend: Backend, prompt: int, requested: int | None, clamp: bool) -> tuple[Fit, int | None]:
    return fit(backend.adapter.length_rule, backend.context, prompt, requested, clamp)  # type: ignore[arg-type]


def context_error(request: ProxyRequest, prompt: int, largest: ContextWindow) -> ProxyError:
    """The 400 for a request that no backend of its model can hold (``prompt``: its size at least)."""
    if prompt > largest.prompt_limit:
        message = (
            f"This model's maximum context length is {largest.total} tokens. However, your request has "
            f"at least {prompt} input tokens. Please reduce the length of the input messages."
        )
        param = "messages" if request.kind == "chat" else "prompt"
    else:
        room = largest.total - prompt
        message = (
            f"`max_tokens` is too large: {request.max_tokens}. This model's maximum context length is "
            f"{largest.total} tokens and your request has at least {prompt} input tokens, which leaves at most {room}."
        )
        param = "max_tokens"
    return ProxyError(400, message, param=param, code=CONTEXT_CODE)


# Engines' own words for a prompt over the window, with the count they measured (vLLM, SGLang, TGI).
_REFUSAL_COUNTS = (
    re.compile(r"your (?:request|prompt) (?:has|contains) (?:at least )?(\d+) input tokens"),  # vLLM
    re.compile(r"The input \((\d+) tokens\) is longer than the model's context length"),  # SGLang
    re.compile(r"You requested a total of \d+ tokens: (\d+) tokens from the input"),  # SGLang
    re.compile(r"Input length \((\d+) tokens\) exceeds the maximum allowed length"),  # SGLang's scheduler
    re.compile(r"Given: (\d+) `inputs` tokens"),  # TGI: inputs + max_new_tokens over max_total_tokens
    re.compile(r"`inputs` must have less than \d+ tokens\. Given: (\d+)"),  # TGI: over max_input_tokens
)
_REFUSAL_WORDS = (
    "maximum context length",
    "context length",
    "must be <=",
    "must have less than",
    "maximum allowed length",
)


def reroute_after_refusal(
    request: ProxyRequest, backend: str, error: ProxyError, serving: Iterable[Backend], clamp: bool = True
) -> bool:
    """After ``backend``'s engine answered ``error``: True if it refused ``request`` as longer than its
    window and a backend of the model may still hold it, with the engine's own count as its prompt size
    from now on: the refusing backend stays a candidate where that count fits it once the reply limit is
    cut (placement then sends the right limit); False for any other error, or none left."""
    count = refused_prompt_tokens(error)
    if count is None:
        return False
    error.code = CONTEXT_CODE  # what the client sees if no backend is left: OpenAI's code for it
    if error.param is None:
        error.param = "max_tokens" if "max_new_tokens" in error.message or "max_tokens" in error.message else "messages"
    known = request.prompt_token_count
    if count > (known or 0):
        request.prompt_token_count = count
    refusing = next((b for b in serving if b.name == backend), None)
    if (
        count <= (known or 0)
        or refusing is None
        or refusing.context is None
        or _fit(refusing, count, request.max_tokens, clamp) == (Fit.NONE, None)
    ):
        request.excluded.add(backend)  # it cannot hold it (or said nothing new): elsewhere
    return any(b.name not in request.excluded for b in serving)


def refused_prompt_tokens(error: ProxyError) -> int | None:
    """The engine's own prompt count if ``error`` is its refusal of a request over its window
    (0 where it refused for length without saying the count); None for any other error."""
    if error.status not in (400, 413, 422) or not any(word in error.message for word in _REFUSAL_WORDS):
        return None
    for pattern in _REFUSAL_COUNTS:
        found = pattern.search(error.message)
        if found is not None:
            return int(found.group(1))
    return 0
