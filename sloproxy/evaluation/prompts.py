"""Real instructions and the real reply lengths many models gave them (the shared AlpacaEval data).

A workload request takes its instruction, and its true reply length, from here: the length is what
the mapped generator really answered, so a length predictor that reads the prompt has real signal.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import json
import random
from pathlib import Path

PROMPTS_FILE = "alpaca_eval_prompts.jsonl"
LENGTHS_FILE = "alpaca_eval_lengths.csv"
NEAREST = 8  # match mode draws among this many instructions closest to the trace's length


class GeneratorLengths:
    """One generator's (reply length, prompt id) pairs, sorted by length for nearest-length lookups."""

    def __init__(self, generator: str, pairs: list[tuple[int, str]]) -> None:
        if not pairs:
            raise ValueError(f"generator {generator!r} has no lengths")
        self.generator = generator
        self.pairs = sorted(pairs)
        self.lengths = [length for length, _ in self.pairs]

    def nearest(self, rng: random.Random, target: int) -> tuple[int, str]:
        """One of the ``NEAREST`` instructions whose real length is closest to ``target`` (ties by seed)."""
        count = min(NEAREST, len(self.pairs))
        at = bisect.bisect_left(self.lengths, target)
        low, high = at, at  # grow the window [low, high) towards the closer side
        while high - low < count:
            if low == 0:
                high += 1
            elif high == len(self.pairs) or target - self.lengths[low - 1] <= self.lengths[high] - target:
                low -= 1
            else:
                high += 1
        return self.pairs[rng.randrange(low, high)]

    def any(self, rng: random.Random) -> tuple[int, str]:
        """A uniformly drawn instruction with its real length (the dataset's own distribution)."""
        return self.pairs[rng.randrange(len(self.pairs))]


class LengthsData:
    """Instructions by prompt id and, per requested generator, their real reply lengths."""

    def __init__(self, instructions: dict[str, str], generators: dict[str, GeneratorLengths]) -> None:
        self.instructions = instructions
        self.generators = generators

    @classmethod
    def load(cls, directory: str | Path, generators: list[str]) -> LengthsData:
        directory = Path(directory)
        prompts_path, lengths_path = directory / PROMPTS_FILE, directory / LENGTHS_FILE
        for path in (prompts_path, lengths_path):
            if not path.is_file():
                raise FileNotFoundError(f"lengths data {path} not found")
        instructions: dict[str, str] = {}
        with open(prompts_path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    item = json.loads(line)
                    text = str(item["instruction"]).strip()
                    if text:
                        instructions[str(item["prompt_id"])] = text
        wanted = set(generators)
        pairs: dict[str, list[tuple[int, str]]] = {g: [] for g in wanted}
        known: set[str] = set()
        with open(lengths_path, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                generator = row["generator"]
                known.add(generator)
                if generator in wanted and row["prompt_id"] in instructions:
                    pairs[generator].append((int(row["output_tokens"]), row["prompt_id"]))
        for generator in generators:
            if generator not in known:
                close = difflib.get_close_matches(generator, sorted(known), n=3, cutoff=0.3)
                hint = f" (closest: {', '.join(close)})" if close else ""
                raise ValueError(f"unknown generator {generator!r} in {lengths_path}{hint}")
        return cls(instructions, {g: GeneratorLengths(g, p) for g, p in pairs.items()})
