"""The profiler: live over HTTP against an emulated vLLM, and in virtual time against the same model."""

from __future__ import annotations

import asyncio

import pytest

from sloproxy.cli import main
from sloproxy.emulator.tokens import count_tokens, render_chat
from sloproxy.fleet.emulated import profile_emulated
from sloproxy.fleet.profile import load_profile
from sloproxy.fleet.profiler import nonce_word, prompt_text
from sloproxy.processes import EmulatorProcess

# Wall-clock jitter on a shared machine is multiplied by the speedup in the scaled-back figures: at 10x a
# 3 ms scheduling hiccup became 30 emulated ms of TTFT and failed the comparison, so keep it moderate.
SPEEDUP = 5.0


def test_prompts_have_the_asked_size_and_distinct_first_words():
    for size in (40, 256, 2048):
        assert count_tokens(render_chat([{"role": "user", "content": prompt_text(size, 7)}])) == size
    words = {nonce_word(n) for n in range(5000)}
    assert len(words) == 5000 and all(1 <= count_tokens(" " + w) == 1 for w in words)


def test_live_profile_of_an_emulated_vllm(tmp_path):
    """A short live run (a few seconds): TTFT grows with concurrency, the SLO concurrency is positive, and
    the figures, scaled back by the speedup, agree with the emulator's model run in virtual time."""
    instance = {"name": "v", "engine": "vllm", "model": "m", "profile": "a10-llama2-7b"}
    out = tmp_path / "a10.yaml"
    with EmulatorProcess([instance], speedup=SPEEDUP) as fleet:
        code = main(
            [
                "profile",
                "--target",
                fleet.url("v"),
                "--model",
                "m",
                "--gpu-type",
                "a10",
                "--cost-per-hour",
                "1.2",
                "--concurrency",
                "1,4,32",
                "--prompt-tokens",
                "256",
                "--output-tokens",
                "32",
                "--seconds",
                "0.8",
                "--time-scale",
                str(SPEEDUP),
                "--full-grid",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    profile = load_profile(out)
    assert (profile.source, profile.gpu_type, profile.time_scale, profile.deployment) == (
        "live",
        "a10",
        SPEEDUP,
        "vllm-m-a10",
    )
    cells = {c.concurrency: c for c in profile.cells}
    assert sorted(cells) == [1, 4, 32]
    assert all(c.errors == 0 and c.requests >= c.concurrency for c in cells.values())
    assert all(c.mean_output_tokens == 32 and c.mean_prompt_tokens == 256 for c in cells.values())
    assert cells[1].ttft_p90_s < cells[4].ttft_p90_s < cells[32].ttft_p90_s
    assert cells[32].throughput_rps > cells[1].throughput_rps
    (capacity,) = profile.capacity
    assert capacity.concurrency > 0 and capacity.throughput_rps > 0
    # In emulated seconds, a lone request's time per token is the model's decode step (~27 ms on an A10).
    model = asyncio.run(profile_emulated("a10-llama2-7b", "m", [1], [256], output_tokens=32, full_grid=True))
    assert cells[1].tpot_p50_s == pytest.approx(model.cells[0].tpot_p50_s, rel=0.25)
    assert cells[1].ttft_p50_s == pytest.approx(model.cells[0].ttft_p50_s, rel=0.5, abs=0.03)


def test_emulated_profile_grows_with_load_and_stops_past_the_slo():
    profile = asyncio.run(profile_emulated("a10-llama2-7b", "m", [1, 2, 4, 8, 16, 32, 64, 128], [1024]))
    ttfts = [c.ttft_p90_s for c in profile.cells]
    assert ttfts == sorted(ttfts)
    # Stopped at the second cell past the SLO: 128 was never run.
    assert profile.cells[-1].concurrency < 128
    assert sum(not profile.slo.met_by(c) for c in profile.cells) == 2
    assert profile.capacity[0].concurrency == max(c.concurrency for c in profile.cells if profile.slo.met_by(c))
    assert (profile.gpu_type, profile.gpus_per_instance, profile.source) == ("a10", 1, "emulated")
    tp4 = asyncio.run(profile_emulated("4xh100-llama3-70b", "big", [1], [128], output_tokens=8))
    assert (tp4.gpu_type, tp4.gpus_per_instance) == ("h100", 4)
