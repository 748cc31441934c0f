"""Adapter ``build()`` alone, per engine call: the SGLang body with the proxy's fields written at its end
(no re-encoding of the prompt) against the rebuilt body (decoded, changed, encoded: what a clamped
reply limit still needs), side by side in one run, 1 to 32 KB prompts.

    .venv/bin/python bench/adapter_build.py
"""

from __future__ import annotations

import json
import timeit

from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.request import ProxyRequest, parse_request


def per_build_us(adapter: SGLangAdapter, request: ProxyRequest) -> float:
    def build() -> None:
        request.body = None  # no decoded body kept from the last call
        adapter.build(request)

    return min(timeit.repeat(build, number=5000, repeat=5)) / 5000 * 1e6


def main() -> None:
    adapter = SGLangAdapter(priority_scheduling=True)
    for size in (1_000, 4_000, 32_000):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * (size // 5)}]
        raw = json.dumps({"model": "m", "messages": messages, "max_tokens": 256, "stream": True}).encode()
        spliced = parse_request("chat", raw)
        rebuilt = parse_request("chat", raw)
        rebuilt.clamped_to = 256  # a changed reply limit: the rebuild path
        times: dict[str, list[float]] = {"spliced": [], "rebuilt": []}
        for _ in range(2):  # alternated, so drift hits both
            times["spliced"].append(per_build_us(adapter, spliced))
            times["rebuilt"].append(per_build_us(adapter, rebuilt))
        print(
            f"{size:6d} B prompt: written at the end {min(times['spliced']):6.2f} us, "
            f"rebuilt {min(times['rebuilt']):6.2f} us per build"
        )


if __name__ == "__main__":
    main()
