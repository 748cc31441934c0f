"""Calibrated capacity: the smallest-fleet search, the derating factor, and the planner applying it."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from sloproxy.cli import main
from sloproxy.evaluation.records import RequestRecord
from sloproxy.evaluation.simprep import SimRequest
from sloproxy.fleet.calibrate import calibrate, class_attainment, derating, interval_slices, smallest_fleet
from sloproxy.fleet.emulated import profile_emulated
from sloproxy.fleet.planner import Planner
from sloproxy.fleet.profile import INTERACTIVE, Calibration, load_profile, save_profile, slo_target
from tests.test_planner import _workload, demand, make_profile


def calibrated(profile, factor: float, slo: str = "interactive"):
    profile.calibration = Calibration(factor=factor, target=0.9, slo=slo)
    return profile


def test_smallest_fleet_brackets_then_bisects():
    calls: list[int] = []

    def attainment(n: int) -> float:
        calls.append(n)
        return min(1.0, n / 10)

    assert smallest_fleet(attainment, 0.9) == 9
    assert len(calls) == len(set(calls)) <= 8  # 1, 2, 4, 8, 16, then bisection in (8, 16]: no repeats
    assert smallest_fleet(lambda n: 1.0, 0.9) == 1
    assert smallest_fleet(lambda n: 0.5, 0.9, limit=20) is None
    assert smallest_fleet(lambda n: 0.95 if n >= 20 else 0.0, 0.9, limit=20) == 20  # the limit itself is tried
    with pytest.raises(ValueError, match="target"):
        smallest_fleet(lambda n: 1.0, 0.0)


def test_derating_is_the_worst_interval_at_the_midpoint_of_its_rounding():
    # 6 needed by the profile, 13 simulated: 6 / 12.5; 3 vs 4: 3 / 3.5; one instance says nothing.
    assert derating([6.0, 3.0, 0.5], [13, 4, 1]) == pytest.approx(0.48)
    assert derating([3.0, 2.0], [2, 2]) == pytest.approx(2.0 / 1.5)  # the profile was pessimistic: > 1
    assert derating([0.4, 0.9], [1, 1]) is None
    with pytest.raises(ValueError):
        derating([1.0], [1, 2])


def test_calibration_gives_each_calibration_interval_its_smallest_fleet():
    """Hand-made truth: interval i needs true[i] instances; the profile says needed[i]. Planned alone
    with the calibrated profile and no headroom, each interval gets at least true[i]."""
    profile = make_profile("m", "h100", rps=4.0, tps=4000.0)
    rows = [demand("m", rps, 10.0, interval=i) for i, rps in enumerate((10.0, 6.0, 22.0, 1.0))]
    truth = [7, 5, 12, 1]  # bursts the profile cannot see: 2.5 -> 7, 1.5 -> 5, 5.5 -> 12
    planner = Planner([profile], INTERACTIVE, headroom=0.0)
    needed = [planner.needed_instances(profile, row) for row in rows]
    assert needed == pytest.approx([2.5, 1.5, 5.5, 0.25])
    cal = calibrate(needed, [lambda n, t=t: 1.0 if n >= t else 0.5 for t in truth], target=0.9, slo="interactive")
    assert cal.smallest == truth
    assert cal.factor == pytest.approx(min(2.5 / 6.5, 1.5 / 4.5, 5.5 / 11.5))
    profile.calibration = cal
    planner = Planner([profile], INTERACTIVE, headroom=0.0)
    for row, t in zip(rows, truth, strict=True):
        assert planner.solve([row])[("m", "h100", "default")] >= t
    # The worst interval (1.5 -> 5) binds exactly: it gets 5, not more.
    assert planner.solve([rows[1]])[("m", "h100", "default")] == 5
    with pytest.raises(ValueError, match="do not reach"):
        calibrate([1.0], [lambda n: 0.0], target=0.9, slo="interactive", limit=4)


def test_planner_applies_the_factor_only_to_its_class():
    profile = calibrated(make_profile("m", "h100", rps=4.0, tps=400.0), 0.5)
    row = demand("m", 6.0, 1000.0)
    interactive = Planner([profile], INTERACTIVE, headroom=0.0)
    assert interactive.capacity(profile, 512) == pytest.approx((2.0, 200.0))
    assert interactive.needed_instances(profile, row) == pytest.approx(5.0)  # tokens bind: 1000 / 200
    batch = Planner([profile], slo_target("batch"), headroom=0.0)
    assert batch.needed_instances(profile, row) == pytest.approx(2.5)
    assert batch.solve([row])[("m", "h100", "default")] == 3
    assert interactive.solve([row])[("m", "h100", "default")] == 5
    empty = calibrated(make_profile("m", "a100", rps=4.0, tps=400.0), 0.0)
    assert math.isinf(Planner([profile, empty], INTERACTIVE).needed_instances(empty, row))


def test_calibration_round_trips_in_profile_files(tmp_path):
    profile = make_profile("m", "h100", 3, 300)
    profile.calibration = Calibration(
        factor=0.26, target=0.9, slo="interactive", workload="w.jsonl", intervals=2, needed=[6.0, 3.8], smallest=[23, 9]
    )
    for name in ("p.yaml", "p.json"):
        save_profile(tmp_path / name, profile)
        assert load_profile(tmp_path / name) == profile
    (tmp_path / "old.yaml").write_text("version: 1\nmodel: m\nengine: vllm\ngpu_type: g\n")
    assert load_profile(tmp_path / "old.yaml").calibration is None  # profiles without one still load


def record(slo_class: str, ttft: float, status: str = "ok") -> RequestRecord:
    return RequestRecord(
        id="r", model="m", slo_class=slo_class, arrival_s=0.0, status=status, ttft_s=ttft, tpot_s=0.01, e2e_s=ttft + 1
    )


def test_class_attainment_holds_the_planned_class_only():
    records = [record("interactive", 0.5), record("interactive", 2.0), record("batch", 2.0), record("batch", 90.0)]
    assert class_attainment(records, "interactive") == 0.5
    assert class_attainment(records, "batch") == 0.5  # deadline 60 s
    assert class_attainment([record("batch", 0.1)], "interactive") == 1.0  # no such class: all requests
    assert class_attainment([record("interactive", 0.1, status="timeout")], "interactive") == 0.0


def test_interval_slices_start_each_slice_at_zero():
    base = SimRequest(
        id="a", model="m", slo_class="interactive", tenant=None, arrival_s=0.0, max_tokens=None, output_tokens=1,
        raw=b"", prompt_tokens=1, hashes={},
    )  # fmt: skip
    requests = [dataclasses.replace(base, arrival_s=t) for t in (100.0, 130.0, 160.0, 260.0, 999.0)]
    slices = interval_slices(requests, 100.0, 50.0, 4)
    assert [[r.arrival_s for r in s] for s in slices] == [[0.0, 30.0], [10.0], [], [10.0, 749.0]]


def test_calibrate_cli_simulates_and_writes_the_factor(tmp_path, capsys):
    """End to end on the emulator: more load needs more instances, the factor lands in the profile file
    and the plan reads it (a live profile is refused: only the emulator can be simulated here)."""
    _workload(tmp_path / "w.jsonl", [1, 40])
    profile = asyncio.run(profile_emulated("a10-llama2-7b", "m1", [1, 2, 4, 8, 16, 32], [256], output_tokens=100))
    save_profile(tmp_path / "a10.yaml", profile)
    args = ["calibrate", "--workload", str(tmp_path / "w.jsonl"), "--profiles", str(tmp_path / "a10.yaml")]
    assert main([*args, "--interval-s", "100", "--window-s", "20"]) == 0
    cal = load_profile(tmp_path / "a10.yaml").calibration
    assert cal is not None and cal.intervals == 2 and cal.slo == "interactive" and cal.window_s == 20
    assert cal.smallest[0] == 1 and cal.smallest[1] >= 2  # 40 req/s needs more than one A10; 1 req/s does not
    # Prompts of a few tokens cost far less than the profiled 256: the simulation raises the capacity.
    assert cal.factor == pytest.approx(cal.needed[1] / (cal.smallest[1] - 0.5), rel=1e-3) and cal.factor > 1
    assert "factor" in capsys.readouterr().out
    live = make_profile("m1", "h100", 3, 300)
    save_profile(tmp_path / "live.yaml", live)
    assert main([*args[:-1], str(tmp_path / "live.yaml"), "--interval-s", "100"]) == 2
    assert "only emulated profiles" in capsys.readouterr().err
