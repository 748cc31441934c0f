"""Which release of each engine an emulated instance behaves as (the ``engine_version`` option).

By default every instance behaves as the newest release its fact sheet was read from; the
engines' contract tests (``tests/test_contract_*.py``) list that behaviour rule by rule, with the
source file and line each rule was read from. An older ``engine_version`` switches back the
rules below, where keeping them is cheap:

* vLLM below 0.12: the rules the emulator modelled as 0.11 (prompt + max_tokens over the window
  refused instead of clamped, ``stream_options: {}`` turning usage on, a non-zero ``priority``
  refused without priority scheduling, no ``X-Vllm-Priority`` header, the older error wording,
  sleep levels 1-2 only with empty replies). The release that changed each rule between 0.11
  and 0.33 was not pinned from source; 0.12 is the boundary the emulator uses for all of them.
* SGLang below 0.5.3: ``GET /get_load`` (as the emulator modelled 0.5.2) and ``context_length``
  in ``/server_info`` always filled.
* TGI below 3.1.1: ``max_new_tokens`` validated whole, no 1024-token rounds; below 3.0:
  ``/generate`` defaults ``max_new_tokens`` to 100; below 2.1: SSE framed ``data:`` without a
  space (axum 0.6).
"""

from __future__ import annotations

import re

DEFAULT_VERSIONS = {"vllm": "0.33.0", "sglang": "0.5.23", "tgi": "3.3.6-dev0"}

VLLM_CURRENT_RULES = (0, 12)
SGLANG_NO_GET_LOAD = (0, 5, 3)
TGI_SSE_SPACE = (2, 1)
TGI_AUTO_MAX_NEW_TOKENS = (3, 0)
TGI_CHUNKED_GENERATION = (3, 1, 1)

_NUMBER = re.compile(r"\d+")


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.33.0"`` -> (0, 33, 0); ``"3.3.6-dev0"`` -> (3, 3, 6); a suffix after the numbers is ignored."""
    parts: list[int] = []
    for piece in text.strip().lstrip("v").split("."):
        match = _NUMBER.match(piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"engine_version {text!r} does not start with a number")
    return tuple(parts)


def version_string(engine: str, configured: str | None) -> str:
    return configured or DEFAULT_VERSIONS[engine]
