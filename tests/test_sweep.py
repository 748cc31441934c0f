"""`sloproxy sweep` without --scales: the capacity search (bracket, then bisect in log space), on real simulations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sloproxy.emulator.fleet import load_fleet
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.sweep import (
    SEARCH_BOUNDS,
    TARGET,
    bracket,
    next_scales,
    parse_policies,
    render_table,
    search,
)

# No ports: they mean nothing to simulate / sweep.
FLEET_YAML = """\
instances:
  - {name: v0, engine: vllm, model: m, profile: a10-llama2-7b}
  - {name: s0, engine: sglang, model: m, profile: a10-llama2-7b}
"""


@pytest.fixture(scope="module")
def files(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import msgspec

    from sloproxy.evaluation.workload import write_workload

    directory = tmp_path_factory.mktemp("sweep")
    fleet = directory / "fleet.yaml"
    fleet.write_text(FLEET_YAML)
    options = BuildOptions(
        trace=str(shared_data / "traces" / "azure_conv_2023.csv"),
        lengths_dir=str(shared_data / "lengths"),
        models=parse_models("m=Meta-Llama-3-8B-Instruct"),
        duration_s=60,
        max_requests=80,
        max_context=4096,
        rate_scale=0.1,  # ~0.2 req/s on two A10s: capacity near 15x this rate
        seed=9,
    )
    requests = build_workload(options)
    underloaded, overloaded = directory / "under.jsonl", directory / "over.jsonl"
    write_workload(underloaded, requests)
    # the same requests 40 times as fast (~8 req/s): well over capacity at scale 1
    write_workload(overloaded, [msgspec.structs.replace(r, arrival_s=r.arrival_s / 40) for r in requests])
    return {"fleet": fleet, "underloaded": underloaded, "overloaded": overloaded}


def _check_search(attainment: dict[float, float], low: float, high: float, resolution: float) -> None:
    assert attainment[low] >= TARGET > attainment[high]
    assert 1 < high / low <= 1 + resolution
    assert all(value >= TARGET for scale, value in attainment.items() if scale <= low)  # nothing below misses
    assert not any(low < scale < high for scale in attainment)


# --- the search's steps, without simulating ---


def _steps(curve, resolution: float = 0.05, count: int = 1) -> dict[float, float]:
    """Run the search against a known attainment curve; return every scale it measured."""
    measured: dict[float, float] = {}
    while scales := next_scales(measured, resolution, count=count):
        assert len(scales) <= count
        measured.update((scale, curve(scale)) for scale in scales)
        measured = dict(sorted(measured.items()))
    return measured


@pytest.mark.parametrize("capacity", [0.02, 0.3, 1.0, 1.7, 2.0, 40.0])
@pytest.mark.parametrize("count", [1, 3])
def test_the_search_brackets_then_narrows_to_the_resolution(capacity: float, count: int) -> None:
    measured = _steps(lambda scale: 1.0 if scale <= capacity else 0.5, count=count)
    low, high = bracket(measured)
    assert low is not None and high is not None
    assert low <= capacity < high
    _check_search(measured, low, high, 0.05)
    # it starts at 1 and brackets in powers of two: up to the first above the capacity, or down to the first below
    power = math.floor(math.log2(capacity))
    walked = range(0, power + 2) if capacity >= 1 else range(power, 1)
    assert {2.0**k for k in walked} <= set(measured)
    if count == 1:  # bisection: ~log2(log 2 / log 1.05) = 4 splits after bracketing
        assert len(measured) <= abs(math.floor(math.log2(capacity))) + 2 + 4


def test_the_search_stops_at_its_bounds() -> None:
    floor, ceiling = SEARCH_BOUNDS
    everything = _steps(lambda scale: 1.0)
    assert bracket(everything) == (ceiling, None) and max(everything) == ceiling == 64
    nothing = _steps(lambda scale: 0.0)
    assert bracket(nothing) == (None, floor) and min(nothing) == floor == 1 / 64
    assert len(everything) == len(nothing) == 7


def test_a_miss_bounds_the_capacity_even_if_a_higher_scale_passes_again() -> None:
    # not monotonic (as with k-section, which measures several scales a round): 1.2 misses, 1.3 passes again
    measured = {1.0: 0.95, 1.1: 0.92, 1.2: 0.85, 1.3: 0.93, 2.0: 0.5}
    assert bracket(measured) == (1.1, 1.2)
    assert next_scales(measured, 0.05) == [1.149]  # splits [1.1, 1.2) in log space; 1.3 changes nothing
    assert next_scales(measured, 0.1) == []  # 1.2 / 1.1 is within 10%


def test_grid_free_sweep_finds_capacity_below_one_within_the_resolution(files, capsys) -> None:
    from sloproxy.cli import main

    argv = ["sweep", "--fleet", str(files["fleet"]), "--workload", str(files["overloaded"])]
    assert main([*argv, "--policies", "round-robin", "--json", "--resolution", "0.05"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"capacity", "bracket", "attainment", "resolution"}
    assert list(result["attainment"]) == ["least-load", "round-robin"]
    for label, values in result["attainment"].items():
        attainment = {float(scale): value for scale, value in values.items()}
        low, high = result["bracket"][label]
        assert result["capacity"][label] == low
        assert high <= 1  # over capacity at scale 1: bracketed downward
        assert attainment[1.0] < TARGET and 0.5 in attainment
        _check_search(attainment, low, high, 0.05)


def test_grid_free_sweep_brackets_an_underloaded_fleet_upward(files, tmp_path: Path) -> None:
    from sloproxy.evaluation.simprep import load_inputs
    from sloproxy.evaluation.sweep import figure_png

    fleet, requests = load_inputs(str(files["fleet"]), str(files["underloaded"]))
    runs = parse_policies("round-robin")
    result = search(fleet, requests, runs, resolution=0.1, jobs=2)  # the two policies side by side
    for label, attainment in result["attainment"].items():
        low, high = result["bracket"][label]
        assert low is not None and high is not None
        assert 4 < low < 64  # far above 1, found by doubling
        assert {1.0, 2.0, 4.0} <= set(attainment)
        _check_search(attainment, low, high, 0.1)
    table = render_table(result)
    low, high = result["bracket"]["round-robin"]
    assert f"[{low:g}, {high:g})" in table
    curve = next(line for line in table.splitlines() if line.startswith("  round-robin"))
    shown = [float(cell[1:]) for cell in curve.split() if cell.startswith("x")]
    assert shown == sorted(result["attainment"]["round-robin"])  # the whole curve, sorted
    assert figure_png(result)[:4] == b"\x89PNG"


def test_a_fleet_file_without_ports_simulates_but_does_not_emulate(files, capsys) -> None:
    from sloproxy.cli import main

    fleet = load_fleet(files["fleet"])
    assert [spec.port for spec in fleet.instances] == [None, None]
    argv = [
        "simulate",
        "--fleet",
        str(files["fleet"]),
        "--workload",
        str(files["underloaded"]),
        "--policy",
        "round-robin",
    ]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 80
    assert main(["emulate", "--fleet", str(files["fleet"])]) == 2
    error = capsys.readouterr().err
    assert "instance v0: no port" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scales", "1,2", "--resolution", "0.1"], "--resolution"),
        (["--resolution", "0"], "--resolution"),
        (["--resolution", "1.5"], "--resolution"),
    ],
)
def test_sweep_resolution_checks(files, capsys, extra: list[str], message: str) -> None:
    from sloproxy.cli import main

    argv = ["sweep", "--fleet", str(files["fleet"]), "--workload", str(files["overloaded"]), "--policies", "edf"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_policy_labels_name_what_the_proxy_knows_of_lengths() -> None:
    runs = {run.label: run for run in parse_policies("slo,slo+median,slo+oracle")}
    assert list(runs) == ["round-robin", "least-load", "slo", "slo+median", "slo+oracle"]
    assert [(runs[k].policy, runs[k].lengths) for k in ("slo", "slo+median", "slo+oracle")] == [
        ("slo", "predicted"),
        ("slo", "median"),
        ("slo", "oracle"),
    ]
    with pytest.raises(ValueError, match="slo\\+guess"):
        parse_policies("slo+guess")
