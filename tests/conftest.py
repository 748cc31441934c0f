"""Shared fixtures: emulated fleets in child processes, reached over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sloproxy.emulator.lengths import prompt_key
from sloproxy.processes import EmulatorProcess
from tests.redis_server import RedisServer, running_redis

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One fleet for the fidelity tests: each engine kind with small, fast-to-fill settings.
FIDELITY_FLEET = [
    {"name": "vllm", "engine": "vllm", "model": "llama-3-8b", "profile": "h100-llama3-8b", "max_model_len": 4096},
    {
        "name": "vllm-legacy",
        "engine": "vllm",
        "model": "llama-3-8b",
        "profile": "h100-llama3-8b",
        "legacy_errors": True,
        "scheduling_policy": "priority",
    },
    {"name": "tgi", "engine": "tgi", "model": "llama-3-8b", "profile": "a10-llama2-7b", "max_concurrent_requests": 4},
    {
        "name": "sglang",
        "engine": "sglang",
        "model": "qwen-7b",
        "profile": "h100-llama3-8b",
        "max_model_len": 4096,
        "max_queued_requests": 64,
    },
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared data expected at {SHARED_DATA}"
    return SHARED_DATA


# Prompts whose true reply length the fleet knows (a lengths file, as a replayed workload has).
LONG_PROMPT = "Write a very long essay."
LONG_REPLY_TOKENS = 3000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    lengths = tmp_path_factory.mktemp("lengths") / "lengths.jsonl"
    lengths.write_text(json.dumps({"prompt_hash": prompt_key(LONG_PROMPT), "output_tokens": LONG_REPLY_TOKENS}) + "\n")
    with EmulatorProcess(FIDELITY_FLEET, speedup=20.0, extra={"lengths": str(lengths)}) as running:
        yield running


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the module (tests/redis_server.py); fails if none is installed."""
    yield from running_redis()
