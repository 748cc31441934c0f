"""Adapter ``build()`` alone, per engine call: the SGLang body with the proxy's fields written at its end
(no re-encoding of the prompt) against the rebuilt body (decoded, changed, encoded: what a clamped
reply limit still needs), side by side in one run, 1 to 32 KB prompts.

    .venv/bin/python bench/adapter_build.py
"""

import json
import timeit

from sloproxy.adapters.sglang import SGLangAdapter
from sloproxy.request import parse_request

for size in (1_000, 4_000, 32_000):
    raw = json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "word " * (size // 5)},
            ],
            "max_tokens": 256,
            "stream": True,
        }
    ).encode()
    a = SGLangAdapter(priority_scheduling=True)
    fast_r = parse_request("chat", raw)
    slow_r = parse_request("chat", raw)
    slow_r.clamped_to = 256

    def fast():
        fast_r.body = None
        a.build(fast_r)

    def slow():
        slow_r.body = None
        a.build(slow_r)

    res = {}
    for name, f in (("spliced", fast), ("rebuilt", slow)) * 2:
        t = min(timeit.repeat(f, number=5000, repeat=5)) / 5000 * 1e6
        res.setdefault(name, []).append(t)
    print(f"{size:6d} B prompt: spliced {min(res['spliced']):6.2f} us, rebuilt {min(res['rebuilt']):6.2f} us per build")
