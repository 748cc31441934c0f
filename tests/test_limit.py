"""A fleet's throughput limit: the rule for "sustained", and the search on a small simulated fleet."""

from __future__ import annotations

from pathlib import Path

import pytest

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.limit import LIMIT_POLICIES, last_third_ttft, run_patient, sustained, throughput_limit
from sloproxy.evaluation.records import RequestRecord
from sloproxy.evaluation.simprep import prepare
from sloproxy.evaluation.sweep import parse_policies, search


def _record(arrival: float, ttft: float | None, status: str = "ok", http: int | None = 200) -> RequestRecord:
    return RequestRecord(
        id=f"r{arrival:g}",
        model="m",
        slo_class="batch",
        arrival_s=arrival,
        status=status,
        http_status=http,
        ttft_s=ttft,
    )


def test_sustained_reads_the_last_third_and_every_outcome() -> None:
    early_slow = [_record(t, 30.0) for t in range(6)] + [_record(t, 1.0) for t in range(6, 9)]
    assert last_third_ttft(early_slow) == 1.0 and sustained(early_slow, 10.0)  # a burst early drained: bounded
    late_slow = [_record(t, 1.0) for t in range(6)] + [_record(t, 30.0) for t in range(6, 9)]
    assert not sustained(late_slow, 10.0) and sustained(late_slow, 40.0)
    refused = [*early_slow, _record(9, None, "rejected", 503)]
    assert not sustained(refused, 10.0)  # a refusal is work the fleet did not do
    too_long = [*early_slow, _record(9, None, "error", 400)]
    assert sustained(too_long, 10.0)  # a prompt no window holds is the client's error
    assert last_third_ttft([_record(0, None, "timeout", None)]) is None


@pytest.fixture(scope="module")
def small(shared_data: Path):
    fleet = FleetSpec(
        instances=[
            InstanceSpec(name="v0", engine="vllm", model="m", profile="a10-llama2-7b", port=0),
            InstanceSpec(name="s0", engine="sglang", model="m", profile="a10-llama2-7b", port=0),
        ]
    )
    options = BuildOptions(
        trace=str(shared_data / "traces" / "azure_conv_2023.csv"),
        lengths_dir=str(shared_data / "lengths"),
        models=parse_models("m=Meta-Llama-3-8B-Instruct"),
        duration_s=120,
        max_requests=150,
        max_context=4096,
        rate_scale=0.25,
        seed=4,
    )
    return fleet, prepare(build_workload(options))


def test_the_limit_brackets_where_queues_stop_being_bounded(small) -> None:
    fleet, requests = small
    result = throughput_limit(fleet, requests, resolution=0.1)
    assert set(result["by_policy"]) == set(LIMIT_POLICIES)
    lows = []
    for policy, entry in result["by_policy"].items():  # least-load
        low, high = entry["bracket"]
        assert low is not None and high is not None and 1 < high / low <= 1.1
        tails = entry["tail_ttft_s"]
        assert tails[low] <= 10.0 < tails[high]
        # below the limit every measured scale is sustained, above it none is
        assert all((tail is not None and tail <= 10.0) == (scale <= low) for scale, tail in tails.items())
        records = run_patient(fleet, requests, policy, low)
        assert sustained(records) and all(r.status == "ok" for r in records)  # nothing refused for being late
        lows.append(low)
    assert result["limit"] == max(lows)
    # an SLO capacity is within the limit: meeting deadlines needs the work done first
    capacity = search(fleet, requests, parse_policies("least-load,slo"), resolution=0.1)["capacity"]
    assert all(c is not None and c <= result["limit"] * 1.1 for c in capacity.values())
