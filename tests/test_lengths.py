"""Reply lengths: a lengths file replays true lengths; ignore_eos gives exactly max_tokens; else seeded."""

from __future__ import annotations

import json

import pytest

from sloproxy.emulator.lengths import LengthTable, prompt_key, reply_length, seeded_length
from sloproxy.emulator.tokens import render_chat
from sloproxy.processes import EmulatorProcess
from tests.helpers import post_json


def test_length_table_reads_workload_records_and_hash_keys(tmp_path):
    messages = [{"role": "user", "content": "Name three colours."}]
    path = tmp_path / "lengths.jsonl"
    path.write_text(
        json.dumps({"messages": messages, "output_tokens": 42})
        + "\n"
        + json.dumps({"prompt": "plain prompt", "output_tokens": 7})
        + "\n"
        + json.dumps({"prompt_hash": "00ff00ff00ff00ff", "output_tokens": 3})
        + "\n"
    )
    table = LengthTable.load(path)
    assert len(table) == 3
    assert table.get(prompt_key(render_chat(messages))) == 42
    assert table.get(prompt_key("plain prompt")) == 7
    assert table.get("00ff00ff00ff00ff") == 3


def test_length_table_rejects_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "output_tokens": -1}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        LengthTable.load(path)


def test_reply_length_rules():
    table = LengthTable({"k": 50})
    assert reply_length("k", 100, ignore_eos=False, table=table) == (50, False)
    assert reply_length("k", 20, ignore_eos=False, table=table) == (20, True)  # capped: finish "length"
    assert reply_length("k", 100, ignore_eos=True, table=table) == (100, True)
    assert reply_length("other", 10_000, ignore_eos=False, table=table) == (seeded_length("other"), False)


def test_seeded_lengths_are_deterministic_and_shaped_like_azure_conv():
    lengths = sorted(seeded_length(f"prompt-{i}") for i in range(4000))
    assert lengths == sorted(seeded_length(f"prompt-{i}") for i in range(4000))
    median = lengths[len(lengths) // 2]
    p99 = lengths[int(len(lengths) * 0.99)]
    assert 115 <= median <= 145  # trace: 129
    assert 450 <= p99 <= 750  # trace: 601


async def test_emulator_replays_lengths_file_over_http(tmp_path):
    messages = [{"role": "user", "content": "Explain paging."}]
    path = tmp_path / "workload.jsonl"
    path.write_text(json.dumps({"messages": messages, "output_tokens": 37, "arrival": 0.0}) + "\n")
    instance = {"name": "s", "engine": "sglang", "model": "m", "lengths": str(path)}
    with EmulatorProcess([instance], speedup=20) as fleet:
        status, body, _ = await post_json(
            fleet.url("s") + "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 500}
        )
        assert status == 200
        assert body["usage"]["completion_tokens"] == 37
        assert body["choices"][0]["finish_reason"] == "stop"
        # The same prompt without a table entry would be seeded; a different prompt is.
        status, body, _ = await post_json(
            fleet.url("s") + "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "Other."}], "max_tokens": 2000},
        )
        expected = seeded_length(prompt_key(render_chat([{"role": "user", "content": "Other."}])))
        assert body["usage"]["completion_tokens"] == expected
