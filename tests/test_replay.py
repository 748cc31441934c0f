"""Replay end to end against emulated engines in a child process (real HTTP, real streams)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from sloproxy.cli import main
from sloproxy.emulator.tokens import count_tokens, render_chat
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import read_run
from sloproxy.evaluation.replay import chat_url, replay, replay_run, select
from sloproxy.evaluation.workload import WorkloadRequest, read_workload, write_workload
from sloproxy.processes import EmulatorProcess

SPEEDUP = 20.0


def _extra_requests(base: WorkloadRequest) -> list[WorkloadRequest]:
    """An unknown model, and long replies for the TGI instance that admits one request at a time."""
    unknown = msgspec.structs.replace(
        base, id="x-unknown", model="no-such-model", messages=[{"role": "user", "content": "Unknown model?"}]
    )
    busy = [
        msgspec.structs.replace(
            base,
            id=f"x-busy{i}",
            model="tgi-model",
            arrival_s=0.0,
            max_tokens=None,
            output_tokens=800,
            messages=[{"role": "user", "content": f"Busy request {i}: write a long story."}],
        )
        for i in range(4)
    ]
    slow = msgspec.structs.replace(
        base,
        id="x-slow",
        arrival_s=0.0,
        max_tokens=None,
        output_tokens=3000,
        messages=[{"role": "user", "content": "A very long reply that the replay gives up on."}],
    )
    return [unknown, *busy, slow]


@pytest.fixture(scope="module")
def setup(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, EmulatorProcess]]:
    options = BuildOptions(
        trace=str(shared_data / "traces" / "azure_conv_2023.csv"),
        lengths_dir=str(shared_data / "lengths"),
        models=parse_models("llama-3-8b=Meta-Llama-3-8B-Instruct"),
        max_requests=30,
        rate_scale=4.0,
        max_context=8192,
        seed=3,
    )
    requests = build_workload(options)
    directory = tmp_path_factory.mktemp("replay")
    path, lengths = directory / "workload.jsonl", directory / "lengths.jsonl"
    write_workload(path, requests)
    write_workload(lengths, [*requests, *_extra_requests(requests[0])])  # a workload file is a lengths file
    fleet = [
        {"name": "vllm", "engine": "vllm", "model": "llama-3-8b", "profile": "h100-llama3-8b"},
        {
            "name": "tgi",
            "engine": "tgi",
            "model": "tgi-model",
            "profile": "a10-llama2-7b",
            "max_concurrent_requests": 1,
        },
    ]
    with EmulatorProcess(fleet, speedup=SPEEDUP, extra={"lengths": str(lengths)}) as running:
        yield path, running


async def test_replay_measures_every_request(setup: tuple[Path, EmulatorProcess]) -> None:
    path, fleet = setup
    requests = read_workload(path)
    meta, records = await replay_run(
        requests, fleet.url("vllm"), workload=str(path), label="direct", speedup=SPEEDUP, timeout_s=600.0
    )
    assert [r.id for r in records] == [r.id for r in requests]
    assert meta.source == "replay" and meta.label == "direct" and meta.speedup == SPEEDUP
    assert meta.duration_s == pytest.approx(requests[-1].arrival_s)
    assert set(meta.extra["send_lag_s"]) == {"p50", "p99", "max"} and "p99_ms" in meta.extra["loop_lag_ms"]
    assert meta.slo_classes["interactive"]["ttft_s"] == 1.5
    for record, request in zip(records, requests, strict=True):
        assert record.status == "ok", record.error
        assert record.http_status == 200 and record.slo_class == request.slo_class
        assert 0 < record.ttft_s <= record.e2e_s
        assert record.output_tokens == request.output_tokens == record.expected_output_tokens
        assert record.prompt_tokens == count_tokens(render_chat(request.messages))
        if record.output_tokens > 1:
            expected_tpot = (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)
            assert record.tpot_s == pytest.approx(expected_tpot)


async def test_statuses_error_rejected_timeout(setup: tuple[Path, EmulatorProcess]) -> None:
    path, fleet = setup
    extra = {r.id: r for r in _extra_requests(read_workload(path)[0])}
    # vLLM: an unknown model is a 404 error
    (unknown,) = await replay([extra["x-unknown"]], fleet.url("vllm"), speedup=SPEEDUP, timeout_s=60.0)
    assert unknown.status == "error" and unknown.http_status == 404 and "no-such-model" in unknown.error
    assert unknown.ttft_s is None and unknown.e2e_s is None
    # TGI admits one request at a time and answers 429 past that: shed load counts as rejected
    busy = [r for key, r in sorted(extra.items()) if key.startswith("x-busy")]
    records = await replay(busy, fleet.url("tgi"), speedup=SPEEDUP, timeout_s=600.0)
    statuses = sorted(r.status for r in records)
    assert "rejected" in statuses and set(statuses) <= {"ok", "rejected"}
    assert all(r.http_status == 429 for r in records if r.status == "rejected")
    # a reply longer than the per-request bound (trace seconds) is a timeout
    (slow,) = await replay([extra["x-slow"]], fleet.url("vllm"), speedup=SPEEDUP, timeout_s=2.0)
    assert slow.status == "timeout" and slow.e2e_s is None
    # a target nobody listens on is a connection error
    (refused,) = await replay([extra["x-unknown"]], "http://127.0.0.1:9", speedup=SPEEDUP, timeout_s=60.0)
    assert refused.status == "error" and refused.http_status is None


def test_cli_replay_then_report(setup: tuple[Path, EmulatorProcess], tmp_path: Path, capsys) -> None:
    path, fleet = setup
    run = tmp_path / "run.jsonl"
    argv = ["replay", "--workload", str(path), "--target", fleet.url("vllm") + "/v1", "--out", str(run)]
    argv += ["--speedup", str(SPEEDUP), "--max-requests", "10", "--label", "cli", "--no-progress"]
    assert main(argv) == 0
    meta, records = read_run(run)
    assert meta.label == "cli" and len(records) == 10
    assert all(r.status == "ok" for r in records)
    capsys.readouterr()
    assert main(["report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["requests"] == 10 and report["overall"]["ok"] == 10


def test_selection_and_urls() -> None:
    base = WorkloadRequest(
        id="r0",
        arrival_s=0.0,
        model="m",
        slo_class="batch",
        messages=[],
        max_tokens=None,
        output_tokens=1,
        prompt_tokens=1,
        generator="g",
        prompt_id=None,
    )
    requests = [msgspec.structs.replace(base, id=f"r{i}", arrival_s=float(i)) for i in range(10)]
    assert [r.id for r in select(requests, max_duration_s=4.0)] == ["r0", "r1", "r2", "r3", "r4"]
    assert [r.id for r in select(requests[::-1], limit=2)] == ["r0", "r1"]
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
