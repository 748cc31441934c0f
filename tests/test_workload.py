"""Workload builder: determinism, shape, trace parsing, and that the emulator reads the file as built."""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest

from sloproxy.cli import main
from sloproxy.emulator.lengths import LengthTable, prompt_key
from sloproxy.emulator.tokens import count_tokens, render_chat
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models, parse_shares
from sloproxy.evaluation.traces import load_trace
from sloproxy.evaluation.workload import WorkloadRequest, read_workload, write_workload

MODELS = "llama=Meta-Llama-3-8B-Instruct,gpt=gpt4_1106_preview:3"


def options(data: Path, trace: str = "azure_conv_2023.csv", **overrides) -> BuildOptions:
    base = {
        "trace": str(data / "traces" / trace),
        "lengths_dir": str(data / "lengths"),
        "models": parse_models(MODELS),
        "max_requests": 2000,
        "seed": 7,
    }
    return BuildOptions(**{**base, **overrides})


@pytest.fixture(scope="module")
def workload(shared_data: Path) -> list[WorkloadRequest]:
    return build_workload(options(shared_data))


@pytest.fixture(scope="module")
def real_lengths(shared_data: Path) -> dict[tuple[str, str], int]:
    with open(shared_data / "lengths" / "alpaca_eval_lengths.csv", newline="") as handle:
        return {
            (row["prompt_id"], row["generator"]): int(row["output_tokens"])
            for row in csv.DictReader(handle)
            if row["generator"] in ("Meta-Llama-3-8B-Instruct", "gpt4_1106_preview")
        }


def test_same_seed_same_bytes_other_seed_differs(shared_data: Path, tmp_path: Path) -> None:
    small = {"max_requests": 300}
    write_workload(tmp_path / "a.jsonl", build_workload(options(shared_data, **small)))
    write_workload(tmp_path / "b.jsonl", build_workload(options(shared_data, **small)))
    write_workload(tmp_path / "c.jsonl", build_workload(options(shared_data, seed=8, **small)))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_round_trip_and_fields(workload: list[WorkloadRequest], tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, workload)
    assert read_workload(path) == workload
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {
        "id",
        "arrival_s",
        "model",
        "slo_class",
        "messages",
        "max_tokens",
        "output_tokens",
        "prompt_tokens",
        "generator",
        "prompt_id",
        "tenant",
    }
    assert first["id"] == "r000000" and first["arrival_s"] == 0.0
    assert first["messages"][0]["role"] == "user"


def test_shape_arrivals_mix_and_caps(workload: list[WorkloadRequest], shared_data: Path) -> None:
    assert len(workload) == 2000
    arrivals = [r.arrival_s for r in workload]
    assert arrivals == sorted(arrivals)
    assert len({r.id for r in workload}) == len(workload)
    classes = Counter(r.slo_class for r in workload)
    assert set(classes) == {"interactive", "batch"}
    assert abs(classes["interactive"] / 2000 - 0.6) < 0.04
    models = Counter(r.model for r in workload)
    assert abs(models["gpt"] / 2000 - 0.75) < 0.04
    generators = {"llama": "Meta-Llama-3-8B-Instruct", "gpt": "gpt4_1106_preview"}
    assert all(r.generator == generators[r.model] for r in workload)
    sent = [r.max_tokens for r in workload if r.max_tokens is not None]
    assert abs(len(sent) / 2000 - 0.5) < 0.04
    assert set(sent) <= {1024, 2048, 4096}
    assert all(r.output_tokens <= r.max_tokens for r in workload if r.max_tokens is not None)
    trace = load_trace(shared_data / "traces" / "azure_conv_2023.csv")[:2000]
    assert [r.prompt_tokens for r in workload] == [row.input_tokens for row in trace]
    assert arrivals == pytest.approx([row.t_s for row in trace], abs=1e-6)


def test_true_lengths_are_the_datasets_and_follow_the_trace(
    workload: list[WorkloadRequest], real_lengths: dict[tuple[str, str], int], shared_data: Path
) -> None:
    for r in workload:
        real = real_lengths[(r.prompt_id, r.generator)]
        assert r.output_tokens == (min(real, r.max_tokens) if r.max_tokens else real)
    trace = load_trace(shared_data / "traces" / "azure_conv_2023.csv")[:2000]
    # match mode: the real length of the chosen instruction tracks the trace's output length
    ours = np.log([r.output_tokens for r in workload])
    theirs = np.log([max(row.output_tokens, 1) for row in trace])
    assert np.corrcoef(ours, theirs)[0, 1] > 0.8


def test_dataset_mode_keeps_the_generators_distribution(
    shared_data: Path, real_lengths: dict[tuple[str, str], int]
) -> None:
    requests = build_workload(options(shared_data, output_lengths="dataset", max_tokens_share=0.0))
    gpt = [r.output_tokens for r in requests if r.generator == "gpt4_1106_preview"]
    dataset = [v for (_, g), v in real_lengths.items() if g == "gpt4_1106_preview"]
    assert np.median(gpt) == pytest.approx(np.median(dataset), rel=0.15)
    assert all(r.max_tokens is None for r in requests)


def test_prompts_padded_to_the_trace_size_by_the_emulators_count(workload: list[WorkloadRequest]) -> None:
    padded = 0
    for r in workload:
        tokens = count_tokens(render_chat(r.messages))
        content = r.messages[0]["content"]
        assert content.endswith(content.split(f"Request {r.id}: ", 1)[1])
        if content.startswith("Request "):  # the instruction alone is already longer than the trace's input
            assert tokens >= r.prompt_tokens - 1
        else:
            padded += 1
            assert abs(tokens - r.prompt_tokens) <= 1
    assert padded > 0.9 * len(workload)


def test_prompt_keys_unique_and_emulator_reads_the_workload(workload: list[WorkloadRequest], tmp_path: Path) -> None:
    keys = [prompt_key(render_chat(r.messages)) for r in workload]
    assert len(set(keys)) == len(keys)
    path = tmp_path / "w.jsonl"
    write_workload(path, workload)
    table = LengthTable.load(path)
    assert len(table) == len(workload)
    assert all(table.get(key) == r.output_tokens for key, r in zip(keys, workload, strict=True))


def test_rate_scale_and_duration(shared_data: Path) -> None:
    base = build_workload(options(shared_data, max_requests=500))
    faster = build_workload(options(shared_data, max_requests=500, rate_scale=2.0))
    assert faster[-1].arrival_s == pytest.approx(base[-1].arrival_s / 2, abs=1e-5)
    assert [r.arrival_s for r in faster] == pytest.approx([r.arrival_s / 2 for r in base], abs=1e-5)
    assert [r.messages for r in faster] == [r.messages for r in base]  # same requests, only the clock changes
    trace = load_trace(shared_data / "traces" / "azure_conv_2023.csv")
    window = build_workload(options(shared_data, max_requests=None, start_s=100.0, duration_s=60.0, rate_scale=2))
    expected = [row for row in trace if 100.0 <= row.t_s < 160.0]
    assert len(window) == len(expected)
    assert window[-1].arrival_s == pytest.approx((expected[-1].t_s - expected[0].t_s) / 2, abs=1e-5)


def test_all_three_traces(shared_data: Path) -> None:
    sizes = {"azure_conv_2023.csv": 19366, "azure_code_2023.csv": 8819, "mooncake_synthetic.jsonl": 3993}
    for name, rows in sizes.items():
        trace = load_trace(shared_data / "traces" / name)
        assert len(trace) == rows
        assert trace[0].t_s == 0.0 and all(a.t_s <= b.t_s for a, b in itertools.pairwise(trace))
        assert 900 < trace[-1].t_s < 3700
        assert all(row.input_tokens > 0 and row.output_tokens >= 0 for row in trace)
    mooncake = load_trace(shared_data / "traces" / "mooncake_synthetic.jsonl")
    assert mooncake[0].input_tokens == 40160 and mooncake[0].hash_ids[:3] == (0, 1, 2)
    code = build_workload(options(shared_data, "azure_code_2023.csv", max_requests=100))
    assert [r.prompt_tokens for r in code] == [row.input_tokens for row in load_trace(code_path(shared_data))[:100]]


def code_path(data: Path) -> Path:
    return data / "traces" / "azure_code_2023.csv"


def test_mooncake_shared_blocks_share_a_prompt_prefix(shared_data: Path) -> None:
    trace = load_trace(shared_data / "traces" / "mooncake_synthetic.jsonl")[:200]
    requests = build_workload(options(shared_data, "mooncake_synthetic.jsonl", max_requests=200, max_tokens_share=0))
    by_first: dict[int, list[int]] = {}
    for index, row in enumerate(trace):
        if len(row.hash_ids) >= 3 and row.input_tokens > 2000:
            by_first.setdefault(row.hash_ids[0], []).append(index)
    pairs = [(a, b) for group in by_first.values() for a, b in itertools.pairwise(group)]
    assert pairs, "the trace's first rows share leading blocks"
    for a, b in pairs:
        shared = 0
        for x, y in zip(trace[a].hash_ids, trace[b].hash_ids, strict=False):
            if x != y:
                break
            shared += 1
        text_a, text_b = requests[a].messages[0]["content"], requests[b].messages[0]["content"]
        common = next((i for i, (x, y) in enumerate(zip(text_a, text_b, strict=False)) if x != y), len(text_a))
        # ~512 tokens per shared block, unless the shorter prompt's padding ends (at most an instruction) before
        shortest = min(trace[a].input_tokens, trace[b].input_tokens)
        assert count_tokens(text_a[:common]) >= min(500 * shared, shortest - 520)
    assert abs(count_tokens(render_chat(requests[0].messages)) - 40160) <= 1


def test_max_context_clips_prompts(shared_data: Path) -> None:
    requests = build_workload(options(shared_data, "mooncake_synthetic.jsonl", max_requests=50, max_context=8192))
    for r in requests:
        tokens = count_tokens(render_chat(r.messages))
        if not r.messages[0]["content"].startswith("Request "):
            assert tokens + (r.max_tokens or r.output_tokens) <= 8192


def test_input_scale_lengthens_prompts_by_the_factor(shared_data: Path) -> None:
    plain = build_workload(options(shared_data, max_requests=40))
    long = build_workload(options(shared_data, max_requests=40, input_scale=3.5))
    for short, scaled in zip(plain, long, strict=True):
        assert scaled.prompt_tokens == round(short.prompt_tokens * 3.5)
        assert (scaled.output_tokens, scaled.max_tokens, scaled.prompt_id) == (
            short.output_tokens,
            short.max_tokens,
            short.prompt_id,
        )
        if not scaled.messages[0]["content"].startswith("Request "):  # padded: its size is the scaled one
            assert abs(count_tokens(render_chat(scaled.messages)) - scaled.prompt_tokens) <= 1
    with pytest.raises(ValueError, match="--input-scale must be positive"):
        build_workload(options(shared_data, max_requests=5, input_scale=0))


def test_bad_input_is_reported(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown generator 'Meta-Llama-3-8B'"):
        build_workload(options(shared_data, models=parse_models("m=Meta-Llama-3-8B")))
    with pytest.raises(ValueError, match="NAME=GENERATOR"):
        parse_models("just-a-name")
    with pytest.raises(ValueError, match="positive"):
        parse_shares("interactive=0")
    with pytest.raises(FileNotFoundError):
        build_workload(options(shared_data, trace=str(tmp_path / "missing.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an Azure trace"):
        load_trace(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "r1"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1"):
        read_workload(broken)
    assert main(["workload", "build", "--trace", str(bad), "--lengths-dir", ".", "--models", "a=b", "--out", "x"]) == 2
    assert "not an Azure trace" in capsys.readouterr().err


def test_cli_build_writes_what_the_api_builds(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    argv = ["workload", "build", "--trace", str(shared_data / "traces" / "azure_code_2023.csv")]
    argv += ["--lengths-dir", str(shared_data / "lengths"), "--models", MODELS, "--classes", "interactive=1"]
    argv += ["--rate-scale", "3", "--duration", "120", "--seed", "5", "--out", str(out)]
    assert main(argv) == 0
    expected = build_workload(
        options(
            shared_data,
            "azure_code_2023.csv",
            classes=[("interactive", 1.0)],
            rate_scale=3.0,
            duration_s=120.0,
            seed=5,
            max_requests=None,
        )
    )
    assert out.read_bytes() == b"".join(msgspec.json.encode(r) + b"\n" for r in expected)
    assert {r.slo_class for r in expected} == {"interactive"}
