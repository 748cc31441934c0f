"""The capacity planner: optimal against brute force, clear errors when infeasible, the forecast, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from sloproxy.cli import main
from sloproxy.evaluation.workload import WorkloadRequest, write_workload
from sloproxy.fleet.forecast import IntervalDemand, forecast, measure_demand, peak_window_rate, read_demand
from sloproxy.fleet.measure import finish_profile
from sloproxy.fleet.planner import GpuLimit, PlanError, Planner
from sloproxy.fleet.profile import (
    INTERACTIVE,
    Calibration,
    Cell,
    InstanceProfile,
    load_profile,
    save_profile,
    slo_target,
)


def cell(concurrency: int, prompt: int, rps: float, tps: float, ttft_p90: float = 0.5, tpot_p90: float = 0.05) -> Cell:
    return Cell(
        concurrency=concurrency,
        prompt_tokens=prompt,
        output_tokens=128,
        requests=20,
        errors=0,
        mean_prompt_tokens=prompt,
        mean_output_tokens=128,
        ttft_p50_s=ttft_p90 / 2,
        ttft_p90_s=ttft_p90,
        ttft_mean_s=ttft_p90 / 2,
        tpot_p50_s=tpot_p90 / 2,
        tpot_p90_s=tpot_p90,
        tpot_mean_s=tpot_p90 / 2,
        e2e_p90_s=ttft_p90 + 127 * tpot_p90,
        e2e_mean_s=concurrency / rps,
        throughput_rps=rps,
        output_tokens_per_s=tps,
    )


def make_profile(model: str, gpu: str, rps: float, tps: float, *, gpus: int = 1, cost: float = 1.0) -> InstanceProfile:
    """A profile whose SLO capacity is ``rps`` requests/s and ``tps`` tokens/s at every prompt size."""
    profile = InstanceProfile(model=model, engine="vllm", gpu_type=gpu, gpus_per_instance=gpus, cost_per_gpu_hour=cost)
    return finish_profile(profile, [cell(8, 512, rps, tps)])


def demand(model: str, rps: float, tps: float, *, region: str = "default", interval: int = 0) -> IntervalDemand:
    return IntervalDemand(
        model=model,
        region=region,
        interval=interval,
        start_s=interval * 3600.0,
        requests=100,
        rps=rps,
        output_tps=tps,
        mean_prompt_tokens=512,
        mean_output_tokens=128,
    )


def brute_force(profiles, covers, headroom, min_instances, limits, bound):
    """The least cost over every assignment of 0..bound instances per (model, GPU type), checked directly."""
    best = math.inf
    for counts in itertools.product(range(bound + 1), repeat=len(profiles)):
        ok = all(
            sum(c for p, c in zip(profiles, counts, strict=True) if p.model == m) >= min_instances
            for m in {p.model for p in profiles}
        )
        for row in covers:
            have = [
                (p.capacity_at(row.mean_prompt_tokens), p.derating(INTERACTIVE), c)
                for p, c in zip(profiles, counts, strict=True)
                if p.model == row.model
            ]
            ok &= sum(cap.rps * k * c for cap, k, c in have) >= (1 + headroom) * row.rps - 1e-9
            ok &= sum(cap.output_tps * k * c for cap, k, c in have) >= (1 + headroom) * row.output_tps - 1e-9
        for limit in limits:
            ok &= (
                sum(
                    p.gpus_per_instance * c
                    for p, c in zip(profiles, counts, strict=True)
                    if p.gpu_type == limit.gpu_type
                )
                <= limit.gpus
            )
        if ok:
            best = min(best, sum(p.instance_cost_per_hour * c for p, c in zip(profiles, counts, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_planner_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    profiles = []
    for model in ("m1", "m2"):
        for gpu in ("a100", "h100"):
            rps = rng.uniform(1, 10)
            profile = make_profile(
                model, gpu, rps, rps * rng.uniform(50, 200), gpus=rng.choice((1, 2, 4)), cost=rng.uniform(1, 5)
            )
            if rng.random() < 0.5:  # a calibrated capacity (derated, or raised) is as linear as the profile's
                profile.calibration = Calibration(factor=rng.uniform(0.3, 1.5), target=0.9, slo="interactive")
            profiles.append(profile)
    # Demand a single GPU type covers with at most 5 instances, so an optimum lies within 0..6 each.
    covers = []
    for model in ("m1", "m2"):
        own = [p for p in profiles if p.model == model]
        rps = rng.uniform(0.2, 4.5) * min(p.capacity_at(512).rps * p.derating(INTERACTIVE) for p in own) / 1.1
        tps = rng.uniform(0.2, 4.5) * min(p.capacity_at(512).output_tps * p.derating(INTERACTIVE) for p in own) / 1.1
        covers.append(demand(model, rps, tps))
    min_instances = rng.choice((0, 1))
    limits = [GpuLimit("h100", rng.randint(4, 16))] if seed % 2 else []
    expected = brute_force(profiles, covers, 0.1, min_instances, limits, bound=6)
    planner = Planner(profiles, INTERACTIVE, headroom=0.1, min_instances=min_instances, limits=limits)
    if math.isinf(expected):
        with pytest.raises(PlanError):
            planner.solve(covers)
        return
    solution = planner.solve(covers)
    cost = sum(planner.profile(m, g).instance_cost_per_hour * n for (m, g, _), n in solution.items())
    assert cost == pytest.approx(expected, rel=1e-9)


def test_gpu_limit_too_low_is_a_clear_error():
    profiles = [make_profile("m1", "h100", 5, 500), make_profile("m2", "h100", 5, 500, gpus=2)]
    planner = Planner(profiles, INTERACTIVE, headroom=0.0, limits=[GpuLimit("h100", 3)])
    with pytest.raises(PlanError, match=r"m2 in default .*h100 <= 3"):
        planner.solve([demand("m1", 4, 100), demand("m2", 9, 100)])  # m2 alone needs 2 instances = 4 GPUs


def test_gpu_limit_together_and_missing_model():
    profiles = [make_profile("m1", "h100", 5, 500), make_profile("m2", "h100", 5, 500, gpus=2)]
    planner = Planner(profiles, INTERACTIVE, headroom=0.0, limits=[GpuLimit("h100", 3)])
    with pytest.raises(PlanError, match="not all together"):
        planner.solve([demand("m1", 6, 100), demand("m2", 4, 100)])  # 2 x 1 GPU + 1 x 2 GPUs = 4 > 3
    with pytest.raises(PlanError, match="no profile of model 'm3'"):
        planner.solve([demand("m3", 1, 10)])


def test_regions_have_their_own_instances_and_limits():
    profiles = [make_profile("m1", "a100", 4, 400, cost=1.0), make_profile("m1", "h100", 10, 1000, cost=2.0)]
    planner = Planner(profiles, INTERACTIVE, headroom=0.0, limits=[GpuLimit("h100", 0, region="eu")])
    solution = planner.solve([demand("m1", 9, 100, region="us"), demand("m1", 9, 100, region="eu")])
    assert solution[("m1", "h100", "us")] == 1 and solution[("m1", "a100", "us")] == 0  # 2.0 beats 3 x 1.0
    assert solution[("m1", "a100", "eu")] == 3 and solution[("m1", "h100", "eu")] == 0


def test_plan_per_interval_and_for_peak():
    profiles = [make_profile("m1", "a100", 4, 1000, cost=1.0), make_profile("m1", "h100", 10, 1000, cost=3.0)]
    rows = [demand("m1", r, 10, interval=i) for i, r in enumerate((3, 15, 7))]
    plan = Planner(profiles, INTERACTIVE, headroom=0.0).plan({("m1", "default"): rows}, 3600.0)
    counts = [{a.gpu_type: a.instances for a in i.allocations} for i in plan.intervals]
    assert counts == [{"a100": 1}, {"a100": 4}, {"a100": 2}]
    assert plan.gpu_hours == 7 and plan.peak_gpu_hours == 12 and plan.saved_gpu_hours == 5
    assert plan.kubernetes[1] == {"vllm-m1-a100": 4, "vllm-m1-h100": 0}


def test_capacity_is_the_highest_concurrency_within_the_slo_and_interpolates():
    cells = [
        cell(1, 256, 1.0, 128),
        cell(4, 256, 3.0, 384),
        cell(8, 256, 5.0, 640, ttft_p90=2.0),  # misses TTFT 1.5 s
        cell(16, 256, 6.0, 768),  # within again, but past a miss: not counted
        cell(1, 1024, 0.5, 64, tpot_p90=0.2),  # misses TPOT even alone
        cell(1, 4096, 0.25, 32),
    ]
    profile = finish_profile(InstanceProfile(model="m", engine="vllm", gpu_type="g"), cells)
    table = {c.prompt_tokens: c.concurrency for c in profile.capacity}
    assert table == {256: 4, 1024: 0, 4096: 1}
    loose = {c.prompt_tokens: c.concurrency for c in profile.capacity_for(slo_target("batch"))}
    assert loose == {256: 16, 1024: 1, 4096: 1}
    assert profile.capacity_at(100).rps == 3.0  # below the smallest prompt: the smallest's figure
    assert profile.capacity_at(512).rps == pytest.approx(1.5)  # halfway in log between 3.0 and 0
    assert profile.capacity_at(8192).rps == pytest.approx(0.125)  # beyond: shrinks with the prompt


def test_profile_files_round_trip_and_check_the_version(tmp_path):
    profile = make_profile("m", "h100", 3, 300, gpus=2, cost=2.5)
    for name in ("p.yaml", "p.json"):
        save_profile(tmp_path / name, profile)
        assert load_profile(tmp_path / name) == profile
    (tmp_path / "old.yaml").write_text("version: 99\nmodel: m\n")
    with pytest.raises(ValueError, match="version 99"):
        load_profile(tmp_path / "old.yaml")


def test_peak_window_rate_on_hand_made_arrivals():
    times = [0.0, 1.0, 2.0, 10.0, 10.5, 11.0, 11.5, 30.0]
    assert peak_window_rate(times, [1.0] * len(times), 2.0) == 2.0  # [10, 12) holds 4 -> 2/s
    assert peak_window_rate(times, [1.0] * len(times), 20.0) == pytest.approx(7 / 20)
    assert peak_window_rate(times, [10.0, 0, 0, 1, 1, 1, 1, 0], 5.0) == 2.0  # 10 tokens at t=0 in 5 s
    assert peak_window_rate([], [], 5.0) == 0.0


def test_measured_demand_and_forecasts():
    records_path_rows = []
    # model a: 1 req/s in interval 0 (0-99 s), none in interval 1, 4 req/s in interval 2; region eu for b.
    for t in range(100):
        records_path_rows.append({"arrival_s": float(t), "model": "a", "prompt_tokens": 100, "output_tokens": 10})
    for k in range(400):
        records_path_rows.append({"arrival_s": 200 + k / 4, "model": "a", "prompt_tokens": 300, "output_tokens": 20})
    records_path_rows.append({"arrival_s": 50.0, "model": "b", "region": "eu", "prompt_tokens": 1, "output_tokens": 1})
    from sloproxy.fleet.forecast import DemandRecord

    records = [DemandRecord(**row) for row in records_path_rows]
    measured = measure_demand(records, interval_s=100.0, window_s=10.0)
    a = measured[("a", "default")]
    assert [row.requests for row in a] == [100, 0, 400]
    assert [row.rps for row in a] == [pytest.approx(1.0), 0.0, pytest.approx(4.0)]
    assert a[2].output_tps == pytest.approx(80.0) and a[2].mean_prompt_tokens == 300
    assert [row.requests for row in measured[("b", "eu")]] == [1, 0, 0]
    assert forecast(measured, "seasonal")[("a", "default")][2].rps == pytest.approx(4.0)
    ewma = forecast(measured, "ewma", alpha=0.5)[("a", "default")]
    # f0 = x0 (warm start); f1 = max(0.5 x0 + 0.5 f0, x0) = 1; f2 = max(0.5 x1 + 0.5 f1, x1) = 0.5.
    assert [row.rps for row in ewma] == [pytest.approx(1.0), pytest.approx(1.0), pytest.approx(0.5)]
    assert ewma[2].mean_prompt_tokens == pytest.approx(100)  # interval 1 had no requests: lengths kept
    with pytest.raises(ValueError, match="unknown forecast"):
        forecast(measured, "arima")


def _workload(path, rates):
    """``rates[i]`` requests/s of model m1 during [100 i, 100 (i + 1)), and 0.5 req/s of m2 throughout."""
    rows = []
    for index, rate in enumerate(rates):
        for k in range(int(rate * 100)):
            rows.append((100 * index + k / rate, "m1"))
        for k in range(50):
            rows.append((100 * index + 2 * k, "m2"))
    rows.sort()
    write_workload(
        path,
        [
            WorkloadRequest(
                id=f"r{i:06d}",
                arrival_s=t,
                model=model,
                slo_class="interactive",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=None,
                output_tokens=100,
                prompt_tokens=512,
                generator="g",
                prompt_id=None,
            )
            for i, (t, model) in enumerate(rows)
        ],
    )


def test_plan_cli_json_end_to_end(tmp_path, capsys):
    _workload(tmp_path / "w.jsonl", [2, 8, 4])
    save_profile(tmp_path / "a.yaml", make_profile("m1", "a100", 2.5, 1000, cost=1.1))
    save_profile(tmp_path / "h.json", make_profile("m1", "h100", 6.5, 1000, cost=2.0))
    save_profile(tmp_path / "b.yaml", make_profile("m2", "h100", 1.0, 1000, gpus=2, cost=2.0))
    args = ["plan", "--workload", str(tmp_path / "w.jsonl"), "--profiles"]
    args += [str(tmp_path / n) for n in ("a.yaml", "h.json", "b.yaml")]
    assert main([*args, "--interval-s", "100", "--window-s", "20", "--headroom", "0.1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["intervals"]) == 3
    first = {(a["model"], a["gpu_type"]): a["instances"] for a in plan["intervals"][0]["allocations"]}
    assert first == {("m1", "a100"): 1, ("m2", "h100"): 1}  # 2.2 req/s needed: one a100 at 2.5
    second = {(a["model"], a["gpu_type"]): a["instances"] for a in plan["intervals"][1]["allocations"]}
    assert second == {("m1", "h100"): 1, ("m1", "a100"): 1, ("m2", "h100"): 1}  # 8.8 req/s: 6.5 + 2.5 for 3.1
    assert plan["kubernetes"][1] == {"vllm-m1-a100": 1, "vllm-m1-h100": 1, "vllm-m2-h100": 1}
    assert plan["saved_gpu_hours"] == pytest.approx(plan["peak_gpu_hours"] - plan["gpu_hours"])
    assert plan["saved_gpu_hours"] > 0
    assert read_demand(tmp_path / "w.jsonl")[0].region is None
    # Text output, and an infeasible limit is exit code 2 with a message, not a traceback.
    assert main([*args, "--interval-s", "100"]) == 0
    assert "kustomization.yaml" in capsys.readouterr().out
    assert main([*args, "--interval-s", "100", "--gpu-limit", "h100=1"]) == 2
    assert "no plan meets the demand of m2 in default" in capsys.readouterr().err
