"""``sloproxy workload build``: a trace's arrivals and sizes, real prompts and real reply lengths.

Per trace row (after the ``--start`` / ``--duration`` window, in trace seconds, and ``--max-requests``):

* arrival: the row's time since the first kept row, divided by ``rate_scale``;
* model: drawn by seed with the ``--models`` weights; its generator supplies instruction and length;
* instruction: ``match`` mode draws among the instructions whose real reply length (for that
  generator) is nearest the trace row's output length (keeps the trace's output shape);
  ``dataset`` mode draws any instruction (keeps the generator's own length distribution);
* ``output_tokens``: the generator's real reply length for that instruction, capped at
  ``max_tokens`` when the client sent a smaller one (the engine stops there);
* prompt: context lines + ``Request <id>: <instruction>``, padded to the row's input size by the
  emulator's token count; the id makes every rendered prompt unique in the workload.
  Mooncake rows build their context from one deterministic block per hash id, so rows that share
  leading hash ids share a prompt prefix (as the trace says their KV blocks do).

Every draw comes from a stream seeded by ``seed`` and the draw's purpose, so the same arguments give
byte-identical files and, e.g., changing the model mix leaves the class assignment unchanged.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ..emulator.tokens import count_tokens, render_chat
from .padding import ContextFiller
from .prompts import LengthsData
from .traces import TraceRow, load_trace
from .workload import WorkloadRequest, write_workload

MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake release traces
DEFAULT_CLASS_SHARES = (("interactive", 0.6), ("batch", 0.4))  # EVALUATION.md's default mix
DEFAULT_MAX_TOKENS_CAPS = (1024, 2048, 4096)


class ModelMix(msgspec.Struct, frozen=True):
    name: str  # fleet model name
    generator: str  # AlpacaEval generator whose real lengths it borrows
    weight: float = 1.0


class BuildOptions(msgspec.Struct, kw_only=True):
    trace: str
    lengths_dir: str
    models: list[ModelMix]
    classes: list[tuple[str, float]] = msgspec.field(default_factory=lambda: list(DEFAULT_CLASS_SHARES))
    rate_scale: float = 1.0
    start_s: float = 0.0  # trace seconds skipped
    duration_s: float | None = None  # trace seconds kept (before rate scaling)
    max_requests: int | None = None
    seed: int = 0
    output_lengths: str = "match"  # or "dataset"
    max_tokens_share: float = 0.5  # share of requests that send max_tokens at all
    max_tokens_caps: tuple[int, ...] = DEFAULT_MAX_TOKENS_CAPS
    max_context: int | None = None  # clip prompts so prompt + reply fits this many tokens
    input_scale: float = 1.0  # multiply the trace's input sizes (long-prompt variants of a trace)


def parse_models(text: str) -> list[ModelMix]:
    """``NAME=GENERATOR[:WEIGHT],...`` (generator names contain no ``:`` or ``,``)."""
    mixes: list[ModelMix] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, rest = item.partition("=")
        generator, _, weight = rest.partition(":")
        if not sep or not name.strip() or not generator.strip():
            raise ValueError(f"--models: expected NAME=GENERATOR[:WEIGHT], got {item!r}")
        mixes.append(ModelMix(name.strip(), generator.strip(), _positive(weight or "1", f"--models weight of {name}")))
    if not mixes:
        raise ValueError("--models: at least one NAME=GENERATOR")
    if len({m.name for m in mixes}) != len(mixes):
        raise ValueError("--models: a model name appears twice")
    return mixes


def parse_shares(text: str) -> list[tuple[str, float]]:
    """``NAME=SHARE,...`` with positive shares (normalised when drawing)."""
    shares: list[tuple[str, float]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, share = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--classes: expected NAME=SHARE, got {item!r}")
        shares.append((name.strip(), _positive(share, f"--classes share of {name}")))
    if not shares:
        raise ValueError("--classes: at least one NAME=SHARE")
    return shares


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{what} must be positive")
    return value


def select_rows(rows: Sequence[TraceRow], options: BuildOptions) -> list[TraceRow]:
    """The trace window: ``start_s <= t < start_s + duration_s`` (trace seconds), then the first N."""
    end = options.start_s + options.duration_s if options.duration_s is not None else float("inf")
    kept = [r for r in rows if options.start_s <= r.t_s < end]
    if options.max_requests is not None:
        kept = kept[: options.max_requests]
    if not kept:
        raise ValueError("the trace window holds no requests (check --start / --duration)")
    return kept


def build_workload(options: BuildOptions) -> list[WorkloadRequest]:
    if options.rate_scale <= 0:
        raise ValueError("--rate-scale must be positive")
    if options.output_lengths not in ("match", "dataset"):
        raise ValueError("--output-lengths must be match or dataset")
    if not 0.0 <= options.max_tokens_share <= 1.0:
        raise ValueError("--max-tokens-share must be within [0, 1]")
    if options.input_scale <= 0:
        raise ValueError("--input-scale must be positive")
    if options.max_tokens_share > 0 and (not options.max_tokens_caps or min(options.max_tokens_caps) < 1):
        raise ValueError("--max-tokens-caps must be positive integers")
    rows = select_rows(load_trace(options.trace), options)
    data = LengthsData.load(options.lengths_dir, sorted({m.generator for m in options.models}))
    filler = ContextFiller(list(data.instructions.values()))
    seed = options.seed
    streams = {name: random.Random(f"{seed}:{name}") for name in ("model", "class", "prompt", "cap", "context")}
    models, model_weights = options.models, [m.weight for m in options.models]
    class_names, class_weights = [c for c, _ in options.classes], [w for _, w in options.classes]
    overhead = count_tokens(render_chat([{"role": "user", "content": "x"}])) - 1

    @functools.lru_cache(maxsize=4096)
    def block(hash_id: int, tokens: int) -> tuple[str, int]:
        # the same stream for a whole block or its first ``tokens``: a shorter one is a prefix
        return filler.fill_counted(random.Random(f"{seed}:block:{hash_id}"), tokens)

    def context(row: TraceRow, budget: int) -> str:
        if budget <= 0:
            return ""
        if not row.hash_ids:
            return filler.fill(streams["context"], budget)
        parts: list[str] = []
        used = 0
        for hash_id in row.hash_ids:  # whole blocks while they fit, then a prefix of the next one
            room = budget - used - (1 if parts else 0)
            if room <= 0:
                break
            text, tokens = block(hash_id, min(room, MOONCAKE_BLOCK_TOKENS))
            if text:
                used += tokens + (1 if parts else 0)
                parts.append(text)
        room = budget - used - (1 if parts else 0)
        if room > 0:  # the trace's hash ids cover less than its input length
            parts.append(filler.fill(streams["context"], room))
        return "\n".join(p for p in parts if p)

    first = rows[0].t_s
    requests: list[WorkloadRequest] = []
    for index, row in enumerate(rows):
        rid = f"r{index:06d}"
        model = streams["model"].choices(models, model_weights)[0]
        slo_class = streams["class"].choices(class_names, class_weights)[0]
        lengths = data.generators[model.generator]
        if options.output_lengths == "match":
            true_length, prompt_id = lengths.nearest(streams["prompt"], row.output_tokens)
        else:
            true_length, prompt_id = lengths.any(streams["prompt"])
        max_tokens = None
        if options.max_tokens_share > 0 and streams["cap"].random() < options.max_tokens_share:
            max_tokens = streams["cap"].choice(options.max_tokens_caps)
        output_tokens = min(true_length, max_tokens) if max_tokens is not None else true_length
        target = round(row.input_tokens * options.input_scale)
        if options.max_context is not None:
            target = min(target, options.max_context - (max_tokens or output_tokens) - 1)
        tail = f"Request {rid}: {data.instructions[prompt_id]}"
        padding = context(row, target - overhead - count_tokens(tail) - 1)
        content = f"{padding}\n\n{tail}" if padding else tail
        requests.append(
            WorkloadRequest(
                id=rid,
                arrival_s=round((row.t_s - first) / options.rate_scale, 6),
                model=model.name,
                slo_class=slo_class,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                output_tokens=max(output_tokens, 1),
                prompt_tokens=round(row.input_tokens * options.input_scale),
                generator=model.generator,
                prompt_id=prompt_id,
            )
        )
    return requests


def build_to_file(options: BuildOptions, out: str | Path) -> list[WorkloadRequest]:
    """Build and write the workload; returns the requests (the CLI prints a summary of them)."""
    requests = build_workload(options)
    write_workload(out, requests)
    return requests
