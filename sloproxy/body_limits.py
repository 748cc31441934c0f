"""Bounds on what a client body may cost: JSON nesting depth and prompt size, checked cheaply.

Why: msgspec decodes ``Any`` values (chat content parts, unknown fields) recursively, so a body
nested ~1,000 levels deep meets Python's recursion limit, and one nested a little less passes
validation only to fail later, deeper in the stack, when an adapter decodes it to a dict (a 500).
A fixed, configured depth keeps every later step safe. Both checks cost O(1) for ordinary bodies:
the depth scan runs only when the body has more opening brackets than the limit, and the prompt
is measured only when the body is larger than the prompt limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def nesting_exceeds(raw: bytes, limit: int, siblings: int = 0) -> bool:
    """Whether arrays and objects in ``raw`` nest deeper than ``limit``. ``raw`` must be valid JSON
    (call it after decoding succeeded), so its quotes pair up once escapes are gone.

    The exact scan runs only when the number of openers, less ``siblings`` (containers known to sit
    beside another on the same level: at most one of them lies on the deepest path), exceeds the limit.
    """
    if raw.count(b"[") + raw.count(b"{") - siblings <= limit:
        return False
    if b"\\" in raw:  # escaped backslashes first (so `\\"` still closes its string), then escaped quotes
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Brackets and quotes only; between the quotes (odd pieces) is string content, dropped.
    structure = b"".join(raw.translate(None, _NOT_STRUCTURE).split(b'"')[::2])
    if len(structure) <= limit:
        return False
    return int(np.cumsum(_STEP[np.frombuffer(structure, dtype=np.uint8)], dtype=np.int32).max()) > limit


def chat_siblings(messages: list[Any]) -> int:
    """Containers beside one another in a chat body: messages, and each message's container parts."""
    siblings = len(messages) - 1
    for message in messages:
        content = message.content
        if isinstance(content, list) and len(content) > 1:
            containers = sum(1 for part in content if isinstance(part, dict | list))
            siblings += max(containers - 1, 0)
    return siblings


def _content_chars(content: Any) -> int:
    """Characters of one chat message's content: a string, or text parts (other parts count nothing)."""
    if isinstance(content, str):
        return len(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict) and isinstance(text := part.get("text"), str):
                total += len(text)
    return total


def prompt_chars(prompt: Any) -> int:
    """Size of a validated prompt: characters of text, one per token id. O(messages + parts)."""
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for item in prompt:
        if isinstance(item, str):  # completions: a list of prompts
            total += len(item)
        elif isinstance(item, int):  # completions: token ids
            total += 1
        elif isinstance(item, list):  # completions: a batch of token-id lists
            total += len(item)
        else:  # chat: a typed message
            total += _content_chars(getattr(item, "content", None))
    return total
